"""Output helpers: output-folder checks, atomic writes and the provenance block every result records.

Nothing half-written on failure: files are written to a temporary sibling and renamed into place.
Every ``OSError`` of a write becomes an :class:`~icl_circuits.errors.OutputError` naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import OutputError


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` can be (or already is) a folder we can write in, creating nothing.

    Accepts an existing folder or a path whose missing parts can be created: the nearest existing
    ancestor must be a folder in which a probe folder can be made (and is removed at once), which
    also catches read-only and virtual file systems such as ``/proc`` where permissions say yes.

    Raises:
        OutputError: empty path, an existing file, a path under a file, or an unwritable place.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise OutputError(errno.EINVAL, f"output folder must be a non-empty path, got {text!r}", str(text))
    folder = Path(text).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            errno.EEXIST, f"output folder {str(text)!r} is an existing file; give a folder (files are written in it)",
            str(text),
        )  # fmt: skip
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(
            errno.ENOTDIR, f"output folder {str(text)!r}: {str(ancestor)!r} is a file, not a folder", str(text)
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".icl_circuits_probe_", dir=ancestor))
    except OSError as e:
        raise OutputError(
            e.errno, f"output folder {str(text)!r}: cannot write under {str(ancestor)!r} ({e.strerror})", str(text)
        ) from e
    return folder


def _output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(e.errno, f"cannot write {str(path)!r}: {e.strerror or e}", str(path))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (parents created) through a temporary file in the same folder, flushed to
    disk, then ``os.replace``: readers see the old file or the whole new one, never a part; on any failure
    the temporary file is removed and an existing ``path`` is left as it was.

    Raises:
        OutputError: the path cannot be written (an ``OSError`` naming the path).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise _output_error(path, e) from e
        raise
    return path


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Serialise ``data`` (NaN-free JSON, 2-space indent) first, then write it atomically: a value that
    cannot be serialised raises before anything (even the folder) is created."""
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n")


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it to ``path`` when the ``with`` body succeeds.

    Yields the temporary folder to fill. On success an existing ``path`` is replaced (removed, then the
    new folder renamed in); on any exception (``KeyboardInterrupt`` included) the temporary folder is
    removed and ``path`` is left as it was, so a reader sees no folder or a complete one.

    Raises:
        OutputError: the parent folder cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _output_error(path, e) from e
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise _output_error(path, e) from e
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("icl_circuits", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance(model: Any, seed: int, **args: Any) -> dict[str, Any]:
    """The block saved beside every result: model spec, seed, arguments and versions."""
    from icl_circuits.models import model_info

    return {"model": model_info(model).to_dict(), "seed": seed, "args": args, "versions": versions()}


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``: every sampler here takes one, no global RNG."""
    return torch.Generator().manual_seed(int(seed))
