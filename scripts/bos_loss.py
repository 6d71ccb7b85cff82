"""The README's BOS numbers on SmolLM2-135M: mean next-token loss of four plain sentences with and without the
tokenizer's BOS (``<|im_start|>``) in front, on the same targets (the text's tokens 2..n), one model load.

    python scripts/bos_loss.py [--model smollm2-135m]

``tests/models/test_gguf.py`` asserts the same comparison (no BOS is the lower loss) with :func:`text_losses`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXTS = (
    "The river runs through the old town, past the market and the church, before it reaches the sea.",
    "When the committee met on Tuesday, the chair proposed a new budget for the library.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "To make bread, mix flour, water, salt and yeast, knead the dough, and let it rise in a warm place.",
)


def text_losses(model: Any, texts: tuple[str, ...] = TEXTS) -> dict[str, float]:
    """``{"none", "bos"}`` -> mean next-token loss (nats) predicting each text's tokens ``2..n`` from its own
    tokens, without and with the tokenizer's BOS in front (same targets in both)."""
    from icl_circuits.tasks.prompts import encode

    losses = {}
    for name, first in (("none", []), ("bos", [model.tokenizer.bos_token_id])):
        nll = []
        for text in texts:
            ids = encode(model, text)
            seq = torch.tensor([first + ids])
            with torch.no_grad():
                logp = model(seq).log_softmax(-1)[0, len(first) : len(first) + len(ids) - 1]
            nll.append(-logp.gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None]))
        losses[name] = torch.cat(nll).mean().item()
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()
    from icl_circuits import load_model

    torch.set_num_threads(1)
    losses = text_losses(load_model(a.model, device="cpu"))
    print(f"text loss without BOS {losses['none']:.2f} nats, with BOS {losses['bos']:.2f} nats")


if __name__ == "__main__":
    main()
