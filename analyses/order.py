"""The ``order`` analysis: ``python analyses/order.py [--model SPEC] [--seed S] [--out DIR]``.

A thin wrapper over ``icl-circuits analyze order``; the analysis itself is in ``icl_circuits.analyze``.
"""

import sys

from icl_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "order", *sys.argv[1:]]))
