"""The ``unseen-task`` analysis: ``python analyses/unseen_task.py [--model SPEC] [--seed S] [--out DIR]``.

A thin wrapper over ``icl-circuits analyze unseen-task``; the analysis itself is in ``icl_circuits.analyze``.
"""

import sys

from icl_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "unseen-task", *sys.argv[1:]]))
