"""Print the feature x architecture matrix as a Markdown table (``--readme``: also write it into README.md).

Runs every cell of ``tests/architecture_matrix.py`` on the tiny random models of ``tests/arch_models.py``
(built in a temporary folder, offline; ~1-2 min on 2 cores)::

    python scripts/arch_matrix.py [--readme]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

BEGIN, END = "<!-- arch-matrix:begin -->", "<!-- arch-matrix:end -->"
LABELS = {"gpt2": "GPT-2", "neox": "GPT-NeoX", "llama": "Llama (GQA)", "qwen2": "Qwen2 (bias, SWA)",
          "gemma2": "Gemma-2 (soft-cap)", "gemma3": "Gemma-3 (QK-norm)"}  # fmt: skip


def matrix() -> str:
    from tests import architecture_matrix as mx
    from tests.arch_models import ARCHS, build, load

    rows: dict[str, dict[str, str]] = {c: {} for c in mx.CELLS}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="arch_matrix_") as tmp:
        for arch in ARCHS:
            model = load(build(arch, Path(tmp) / arch))
            batch = mx.make_batch(model)
            for cell in mx.CELLS:
                r = mx.run_cell(cell, model, batch)
                if r.status == "refused":
                    notes.append(f"{LABELS[arch]} / {cell}: {r.detail}")
                    rows[cell][arch] = f"refused [{len(notes)}]"
                else:
                    rows[cell][arch] = "verified" if r.status == "verified" else f"**{r.status}**"
    head = "| feature | " + " | ".join(LABELS[a] for a in ARCHS) + " |"
    lines = [head, "| --- " * (len(ARCHS) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(rows[c][a] for a in ARCHS) + " |" for c in rows]
    lines += [""] + [f"- [{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="write the table between the markers in README.md")
    args = ap.parse_args()
    table = matrix()
    print(table)
    if args.readme:
        from icl_circuits.io import atomic_write_text

        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
        start, stop = text.index(BEGIN) + len(BEGIN), text.index(END)
        atomic_write_text(readme, text[:start] + "\n" + table + "\n" + text[stop:])


if __name__ == "__main__":
    main()
