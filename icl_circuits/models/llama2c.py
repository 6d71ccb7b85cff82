"""Read llama2.c checkpoints (legacy version-0 export) and tokenizers into Hugging Face objects.

Checkpoint layout (Karpathy's ``llama2.c``, ``export.py`` legacy format): a header of 7 int32
``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (``vocab_size < 0`` means a
separate classifier follows), then float32 arrays in this order::

    token_embedding [vocab, dim]      rms_att [L, dim]        wq [L, dim, dim]
    wk [L, kv_dim, dim]               wv [L, kv_dim, dim]     wo [L, dim, dim]
    rms_ffn [L, dim]                  w1 [L, hidden, dim]     w2 [L, dim, hidden]
    w3 [L, hidden, dim]               rms_final [dim]
    freq_cis_real, freq_cis_imag [seq_len, head_size / 2]     (skipped: RoPE is recomputed)
    wcls [vocab, dim]                 (only when the classifier is not shared)

with ``kv_dim = dim * n_kv_heads / n_heads``. llama2.c applies RoPE to *interleaved* pairs
``(x[2i], x[2i+1])``; Hugging Face Llama rotates halves ``(x[i], x[i + d/2])``. The two agree after
permuting the rows of ``wq``/``wk`` within each head: ``w.view(h, d/h/2, 2, d_in).transpose(1, 2)``.

Tokenizer file: int32 ``max_token_length``, then per token ``float32 score, int32 len, bytes``.
Encoding (llama2.c ``encode``) prepends a space, maps characters to pieces (bytes ``<0xXX>`` as
fallback), then repeatedly merges the adjacent pair whose merged piece has the highest score. That
is byte-level-fallback BPE with merges ranked by the merged piece's score, which is how it is built
here with ``tokenizers``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import CheckpointFormatError

HEADER_BYTES = 7 * 4


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7-int header of a llama2.c checkpoint, with the derived sizes."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.n_kv_heads // self.n_heads

    def n_floats(self) -> int:
        """Number of float32 values the file must hold after the header."""
        d, h, L, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        n = v * d + L * d + L * d * d + 2 * L * self.kv_dim * d + L * d * d
        n += L * d + 3 * L * h * d + d + self.seq_len * self.head_size  # rope tables (2 x half)
        if not self.shared_classifier:
            n += v * d
        return n


def read_header(path: str | os.PathLike[str]) -> Llama2cHeader:
    """Read and validate the header of a llama2.c checkpoint against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"llama2.c checkpoint {str(path)!r}: file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise CheckpointFormatError(
            f"llama2.c checkpoint {str(path)!r}: truncated ({size} bytes, the header alone is 28)"
        )
    with path.open("rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", f.read(HEADER_BYTES))
    values = (dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len)
    if min(values) <= 0 or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise CheckpointFormatError(
            f"llama2.c checkpoint {str(path)!r}: implausible header dim={dim} hidden_dim={hidden} "
            f"n_layers={n_layers} n_heads={n_heads} n_kv_heads={n_kv} vocab_size={vocab} seq_len={seq_len}"
        )
    header = Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len, vocab > 0)
    expected = HEADER_BYTES + 4 * header.n_floats()
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointFormatError(
            f"llama2.c checkpoint {str(path)!r}: {what}: the header implies {expected} bytes "
            f"({'shared' if header.shared_classifier else 'separate'} classifier), the file has {size}"
        )
    return header


def read_weights(path: str | os.PathLike[str]) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a llama2.c checkpoint into llama2.c-named float32 tensors (``wq`` is ``[L, dim, dim]``)."""
    header = read_header(path)
    data = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)
    d, h, L, v, kv = header.dim, header.hidden_dim, header.n_layers, header.vocab_size, header.kv_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("token_embedding", (v, d)),
        ("rms_att", (L, d)),
        ("wq", (L, d, d)),
        ("wk", (L, kv, d)),
        ("wv", (L, kv, d)),
        ("wo", (L, d, d)),
        ("rms_ffn", (L, d)),
        ("w1", (L, h, d)),
        ("w2", (L, d, h)),
        ("w3", (L, h, d)),
        ("rms_final", (d,)),
        ("freq_cis", (header.seq_len * header.head_size,)),
    ]
    if not header.shared_classifier:
        shapes.append(("wcls", (v, d)))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(data[offset : offset + n].copy()).reshape(shape)
        offset += n
    del out["freq_cis"]
    if "wcls" not in out:
        out["wcls"] = out["token_embedding"]
    return header, out


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of ``w [d_out, d_in]`` from interleaved RoPE pairs to Hugging Face's rotate-half order."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def to_hf_llama(path: str | os.PathLike[str]):  # -> LlamaForCausalLM (lazy import keeps start-up fast)
    """Convert a llama2.c checkpoint to an in-memory Hugging Face ``LlamaForCausalLM`` (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    header, w = read_weights(path)
    settings: dict[str, Any] = dict(
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        vocab_size=header.vocab_size,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,  # transformers 5 folds this into rope_parameters
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )
    config = LlamaConfig(**settings)
    config._attn_implementation = "eager"
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": w["token_embedding"],
        "model.norm.weight": w["rms_final"],
        "lm_head.weight": w["wcls"],
    }
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = _permute_rotary(w["wq"][i], header.n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_rotary(w["wk"][i], header.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = w["wv"][i]
        state[p + "self_attn.o_proj.weight"] = w["wo"][i]
        state[p + "mlp.gate_proj.weight"] = w["w1"][i]
        state[p + "mlp.down_proj.weight"] = w["w2"][i]
        state[p + "mlp.up_proj.weight"] = w["w3"][i]
        state[p + "input_layernorm.weight"] = w["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (header.shared_classifier and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointFormatError(f"llama2.c conversion of {str(path)!r}: missing {missing}, unexpected {unexpected}")
    if header.shared_classifier:
        model.tie_weights()
    return model.eval()


def read_tokenizer_pieces(path: str | os.PathLike[str], vocab_size: int) -> list[tuple[bytes, float]]:
    """Read ``vocab_size`` (piece bytes, score) entries of a llama2.c tokenizer file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"llama2.c tokenizer {str(path)!r}: file not found")
    data = path.read_bytes()
    pieces: list[tuple[bytes, float]] = []
    offset = 4
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", data, offset)
            offset += 8
            if n < 0 or offset + n > len(data):
                raise struct.error("piece runs past the end")
            pieces.append((data[offset : offset + n], score))
            offset += n
    except struct.error as e:
        raise CheckpointFormatError(
            f"llama2.c tokenizer {str(path)!r}: truncated after {len(pieces)} of {vocab_size} pieces ({e})"
        ) from e
    return pieces


def load_tokenizer(path: str | os.PathLike[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """Build a fast tokenizer that encodes and decodes exactly as llama2.c's ``run.c`` does.

    Decoding concatenates pieces (bytes ``<0xXX>`` fused back into UTF-8); the leading space that
    encoding prepends is kept, as ``run.c`` keeps it for any token not right after BOS.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = read_tokenizer_pieces(path, vocab_size)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for i, (raw, score) in enumerate(pieces):
        text = specials.get(i) or raw.decode("utf-8", errors="replace")
        if text in vocab:  # undecodable or duplicated pieces: keep the id reachable, never merged into
            text = f"<llama2c_piece_{i}>"
        vocab[text] = i
        scores[text] = score
    merges: list[tuple[float, int, tuple[str, str]]] = []
    for piece, idx in vocab.items():
        if idx < 3 or len(piece) < 2 or piece.startswith("<0x") or piece.startswith("<llama2c_"):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[piece], idx, (left, right)))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[m for _, _, m in merges], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Prepend(" ")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=10**9
    )
