"""The ``information-flow`` analysis: ``python analyses/information_flow.py [--model SPEC] [--seed S] [--out DIR]``.

A thin wrapper over ``icl-circuits analyze information-flow``; the analysis itself is in ``icl_circuits.analyze``.
"""

import sys

from icl_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "information-flow", *sys.argv[1:]]))
