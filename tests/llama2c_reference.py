"""An independent llama2.c reader, writer and plain-torch forward, written from the format notes.

Shares no code with ``icl_circuits.models.llama2c``: llama2.c semantics (interleaved RoPE pairs, RMSNorm
eps 1e-5, SwiGLU, grouped-query attention) computed directly on the file's arrays.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

ORDER = ["emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "rope", "wcls"]


def shapes(dim, hidden, L, n_heads, n_kv, vocab, seq_len, shared):
    hs = dim // n_heads
    kv = n_kv * hs
    s = {
        "emb": (vocab, dim),
        "rms_att": (L, dim),
        "wq": (L, dim, dim),
        "wk": (L, kv, dim),
        "wv": (L, kv, dim),
        "wo": (L, dim, dim),
        "rms_ffn": (L, dim),
        "w1": (L, hidden, dim),
        "w2": (L, dim, hidden),
        "w3": (L, hidden, dim),
        "rms_final": (dim,),
        "rope": (2, seq_len, hs // 2),
    }
    if not shared:
        s["wcls"] = (vocab, dim)
    return s


def write(path: Path, header: tuple[int, ...], w: dict[str, np.ndarray]) -> None:
    """header = (dim, hidden, L, n_heads, n_kv, vocab, seq_len); vocab < 0 for a separate classifier."""
    with open(path, "wb") as f:
        f.write(struct.pack("7i", *header))
        for k in ORDER:
            if k in w:
                f.write(np.ascontiguousarray(w[k], dtype="<f4").tobytes())


def read(path: Path):
    raw = Path(path).read_bytes()
    dim, hidden, L, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared = vocab > 0
    arr = np.frombuffer(raw[28:], dtype="<f4")
    w, o = {}, 0
    for k, shp in shapes(dim, hidden, L, n_heads, n_kv, abs(vocab), seq_len, shared).items():
        n = int(np.prod(shp))
        w[k] = torch.tensor(arr[o : o + n].reshape(shp))
        o += n
    if shared:
        w["wcls"] = w["emb"]
    return (dim, hidden, L, n_heads, n_kv, abs(vocab), seq_len), w


def forward(path: Path, tokens: list[int]) -> torch.Tensor:
    """Logits [pos, vocab] of llama2.c's run.c forward, position by position semantics in one pass."""
    (dim, hidden, L, n_heads, n_kv, vocab, seq_len), w = read(path)
    hs = dim // n_heads
    T = len(tokens)

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x):  # x [T, h, hs], rotate interleaved pairs (2i, 2i+1)
        i = torch.arange(0, hs, 2, dtype=torch.float32)
        freq = 1.0 / (10000.0 ** (i / hs))
        ang = torch.arange(T, dtype=torch.float32)[:, None] * freq[None]  # [T, hs/2]
        cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    x = w["emb"][torch.tensor(tokens)]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(L):
        h = rms(x, w["rms_att"][l])
        q = rope((h @ w["wq"][l].T).view(T, n_heads, hs))
        k = rope((h @ w["wk"][l].T).view(T, n_kv, hs))
        v = (h @ w["wv"][l].T).view(T, n_kv, hs)
        rep = n_heads // n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / hs**0.5 + mask
        z = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T, dim)
        x = x + z @ w["wo"][l].T
        h = rms(x, w["rms_ffn"][l])
        x = x + (torch.nn.functional.silu(h @ w["w1"][l].T) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


def random_checkpoint(path, *, dim=32, hidden=48, L=2, n_heads=4, n_kv=2, vocab=40, seq_len=24, shared=False, seed=0):
    """A random llama2.c checkpoint at ``path`` (weights ~ N(0, 0.3), norms ~ 1); ``shared``: tied classifier."""
    rng = np.random.default_rng(seed)
    w = {
        k: rng.normal(0, 0.3, size=s).astype(np.float32)
        for k, s in shapes(dim, hidden, L, n_heads, n_kv, vocab, seq_len, shared).items()
    }
    w["rms_att"] = 1 + 0.1 * w["rms_att"]
    w["rms_ffn"] = 1 + 0.1 * w["rms_ffn"]
    w["rms_final"] = 1 + 0.1 * w["rms_final"]
    write(path, (dim, hidden, L, n_heads, n_kv, vocab if shared else -vocab, seq_len), w)
    return path
