"""Paths of run directories, checkpoints and outputs: local paths or storage URLs.

The hosts of a pod share one run directory, so ``train.out_dir``, ``sft.out_dir``, ``eval.out_dir``
and ``checkpoint.dir`` may be URLs (``gs://bucket/run``) as well as local paths.
``pathlib.Path("gs://bucket/run")`` is the *local* path ``gs:/bucket/run``; every module that
turns one of those settings into a path calls :func:`as_path` instead:

- a local path (no ``scheme://``) becomes a ``pathlib.Path``: local runs behave exactly as before
  (appends, ``fsync``, atomic ``os.replace``);
- a URL becomes an ``etils.epath.Path`` (the path type orbax and JAX's compilation cache use),
  which keeps it a URL and has the same pathlib API (``/``, ``mkdir``, ``exists``, ``read_text``,
  ``write_bytes``, ``iterdir``, ``rename``). ``gs://`` needs ``gcsfs`` (or TensorFlow) installed;
  ``s3://`` / ``az://`` need ``s3fs`` / ``adlfs``.

Object stores have no append and replace a whole object when its upload completes:
:func:`append_text` therefore reads, extends and rewrites a remote file (a run's jsonl files are
small; its cost grows with the file), and :func:`replace_text` writes a remote file directly
(already atomic there) where a local one goes through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from etils import epath

AnyPath = pathlib.Path | epath.Path
PathLike = str | os.PathLike

INSTALL_HINT = {
    "gs": "pip install gcsfs google-cloud-storage (epath's gs:// backend and orbax's bucket queries)",
    "s3": "pip install s3fs",
    "az": "pip install adlfs",
}


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` (a string, or a path object that spells one)."""
    return "://" in os.fspath(path)


def scheme(path: PathLike) -> str:
    """``gs`` for ``gs://bucket/x``; ``""`` for a local path."""
    s = os.fspath(path)
    return s.split("://", 1)[0] if "://" in s else ""


def as_path(path: PathLike) -> AnyPath:
    """The path object to read and write ``path`` through: ``pathlib.Path`` for a local path,
    ``etils.epath.Path`` for a URL (see the module docstring). ``str()`` of the result is the input
    (a URL stays a URL)."""
    if isinstance(path, epath.Path) and not isinstance(path, pathlib.Path):
        return path if is_url(path) else pathlib.Path(os.fspath(path))
    if not is_url(path):
        return pathlib.Path(path)
    try:
        return epath.Path(os.fspath(path))
    except KeyError:
        raise ValueError(f"'{os.fspath(path)}': unsupported URL scheme '{scheme(path)}://' "
                         "(local paths and gs://, s3://, az:// URLs are supported)") from None


def absolute(path: PathLike) -> AnyPath:
    """:func:`as_path`, made absolute when local (orbax needs absolute local paths); a URL as is."""
    p = as_path(path)
    return p.absolute() if isinstance(p, pathlib.Path) else p


def local_path(path: PathLike) -> pathlib.Path | None:
    """The local ``pathlib.Path`` of ``path``, or None for a URL (for writers that only write locally)."""
    p = as_path(path)
    return p if isinstance(p, pathlib.Path) else None


class StorageError(ValueError):
    """A URL that cannot be used here (its storage client is not installed); the CLIs print it as
    a one-line error."""


def storage_error(path: PathLike, err: BaseException) -> StorageError:
    """A one-line error for a URL whose storage backend is not installed."""
    hint = INSTALL_HINT.get(scheme(path), "install the fsspec filesystem for this scheme")
    return StorageError(f"cannot use '{os.fspath(path)}' ({type(err).__name__}: {err}); {hint}")


def is_file(path: PathLike) -> bool:
    """``as_path(path).is_file()``; a URL whose backend is not installed raises :class:`StorageError`."""
    p = as_path(path)
    try:
        return p.is_file()
    except ImportError as e:
        raise storage_error(p, e) from None


def makedirs(path: PathLike) -> AnyPath:
    """Create the directory (and its parents) when missing; returns its path object. A URL whose
    backend is not installed raises :func:`storage_error`."""
    p = as_path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except ImportError as e:
        raise storage_error(p, e) from None
    return p


def append_text(path: PathLike, text: str, *, sync: bool = False) -> None:
    """Append ``text`` to a file. Local: an append (``sync``: ``fsync`` before returning). URL:
    read, extend, rewrite (object stores have no append; the rewrite is complete once it returns)."""
    p = as_path(path)
    if isinstance(p, pathlib.Path):
        with open(p, "a") as f:
            f.write(text)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        return
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)


def replace_text(path: PathLike, text: str) -> None:
    """Replace the file's contents atomically: a reader sees the old text or the new one. Local:
    a temporary file and ``os.replace``; URL: one write (an object store swaps in a whole object)."""
    p = as_path(path)
    if isinstance(p, pathlib.Path):
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
        return
    p.write_text(text)


HF_WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json")


def upload_dir(src: pathlib.Path, dest: PathLike, *, stale: tuple[str, ...] = HF_WEIGHT_FILES) -> AnyPath:
    """Copy the files of the local directory ``src`` into ``dest`` (files that need local writes,
    such as safetensors, are made in a local staging directory and copied with this). Files of
    ``dest`` matching ``stale`` are removed first (an earlier export may have had other shards)."""
    d = makedirs(dest)
    for pattern in stale:
        for old in list(d.glob(pattern)):
            old.unlink()
    for f in sorted(src.iterdir()):
        if f.is_file():
            with f.open("rb") as fin, (d / f.name).open("wb") as fout:
                shutil.copyfileobj(fin, fout, 16 * 2**20)
    return d


__all__ = ["AnyPath", "StorageError", "absolute", "append_text", "as_path", "is_file", "is_url", "local_path",
           "makedirs", "replace_text", "scheme", "storage_error", "upload_dir"]
