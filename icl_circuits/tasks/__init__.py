"""Few-shot tasks and the prompts built from them.

Data flow: ``registry`` (task files, generated fixture tasks, label substitution) -> ``prompts``
(few-shot prompts, manipulations, tokenization checks) -> ``pairs`` (equal-length clean/corrupted
pairs for patching) and ``roles`` (which demo and role each token has) -> ``scoring`` (batched
readouts at the answer position, accuracy by shots). ``corpus`` is the synthetic corpus the fixture
models were trained on.
"""
