"""The intervention engine: exact activation patching and its gradient approximations.

``resume``: rerun the blocks above layer ``l`` from cached activations, reading one logit
difference (the engine of everything below). ``exact``: batched exact patching (heads, positions,
q/k/v/pattern, residual stream). ``atp``: attribution patching, AtP and AtP* (Kramar et al. 2024).
``paths``: path patching between heads. ``ablation``: mean ablation of heads.
"""
