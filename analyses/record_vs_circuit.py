"""The ``record-vs-circuit`` analysis: ``python analyses/record_vs_circuit.py [--model SPEC] [--seed S] [--out DIR]``.

A thin wrapper over ``icl-circuits analyze record-vs-circuit``; the analysis itself is in ``icl_circuits.analyze``.
"""

import sys

from icl_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "record-vs-circuit", *sys.argv[1:]]))
