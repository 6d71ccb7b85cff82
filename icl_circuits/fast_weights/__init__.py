"""What the demonstrations write through attention: the fast-weight view of in-context learning.

``decompose``: the exact split of a head's output into template, query and per-demo parts, and their
dual form ``dW = sum_s v_s k_s^T`` (Dai et al. 2023). ``transplant``: whether that contribution,
moved into zero-shot prompts, induces the task. ``predictions``: what the account predicts for
repeated, noisy and reordered demos, measured. ``regression``: in-context linear regression against
one step of gradient descent (von Oswald et al. 2023). ``job``: the ``icl-circuits fast-weights`` job.
"""
