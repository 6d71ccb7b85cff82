"""The ``shots-and-noise`` analysis: ``python analyses/shots_and_noise.py [--model SPEC] [--seed S] [--out DIR]``.

A thin wrapper over ``icl-circuits analyze shots-and-noise``; the analysis itself is in ``icl_circuits.analyze``.
"""

import sys

from icl_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", "shots-and-noise", *sys.argv[1:]]))
