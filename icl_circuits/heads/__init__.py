"""Which heads do in-context learning.

``scores``: attention-pattern scores on repeated random tokens (induction, prefix matching,
previous token, duplicate token, in-context score; Olsson et al. 2022). ``composition``: weight-based
scores (OV copying, Q/K/V composition; Elhage et al. 2021). ``scan``: all of them plus mean
ablation, head roles and the circuit; ``report``: its JSON + offline HTML.
"""
