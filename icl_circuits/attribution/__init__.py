"""Attribution of few-shot predictions to heads, positions, paths and demos.

``function_vectors``: heads whose mean task output carries the task (Todd et al. 2024).
``demos``: which demonstrations a head reads from. ``job``: the ``icl-circuits attribute`` job, which
runs :mod:`icl_circuits.patching` on a task and writes ``attribution.json`` + ``attribution.html``.
"""
