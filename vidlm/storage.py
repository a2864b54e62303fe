"""Where manifests, videos and outputs live: local paths or object storage URIs (``s3://``, ``gs://``...).

:func:`location` turns a path or URI into a ``pathlib``-style path (`universal_pathlib
<https://github.com/fsspec/universal_pathlib>`_ over ``fsspec``: ``s3fs``, ``gcsfs``): local paths stay
:class:`pathlib.Path` objects, so every local behaviour is the standard library's, and object storage gets the same
``/``, ``exists``, ``glob``, ``read_bytes``, ``write_text``, ``unlink`` and ``open``. Ray Data and pyarrow get the
URI as a string (``str(location)``) and reach the store through ``pyarrow.fs``.

Both clients find an S3-compatible store the standard way: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) and the
usual ``AWS_*`` credentials; Google Cloud Storage through its application default credentials. Nothing here is
vidlm-specific configuration.

fsspec's listing cache is off for object storage: a job's files are written by other processes (Ray workers,
pyarrow), and a cached listing would hide them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs
from upath import UPath

__all__ = [
    "DIGEST_CONTENT_BYTES",
    "OBJECT_STORES",
    "arrow_files",
    "files_digest",
    "is_remote",
    "join",
    "location",
    "makedirs",
    "open_video",
    "remove",
]

OBJECT_STORES = ("s3", "gs", "gcs")
"""URI schemes :func:`location` opens: S3 and S3-compatible stores (``s3fs``), Google Cloud Storage (``gcsfs``).
Others (``http://``, ``ftp://``, ``memory://``...) are refused: a manifest row must not make a decode worker fetch
an arbitrary URL."""

VIDEO_BLOCK_BYTES = 4 * 2**20
"""Bytes one ranged read of a remote video fetches (fsspec's read-ahead block): a few GETs per clip window."""

DIGEST_CONTENT_BYTES = 64 * 2**20
"""Bytes of its files' content :func:`files_digest` reads at most by default; past them a file counts by size and
modification time."""


def _known_hash(entry, key: list[int]) -> bytes | None:
    """The sha256 an entry of ``files_digest``'s ``known`` holds for a file of stat ``key``; ``None`` for another
    stat or a malformed entry."""
    if not (isinstance(entry, list) and len(entry) == 5 and entry[:4] == key and isinstance(entry[4], str)):
        return None
    try:
        content = bytes.fromhex(entry[4])
    except ValueError:
        return None
    return content if len(content) == hashlib.sha256().digest_size else None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names object storage (a URI with a scheme other than ``file``), not a local file."""
    if isinstance(path, UPath):
        return path.protocol not in ("", "file", "local")
    text = os.fspath(path) if not isinstance(path, str) else path
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme not in ("file", "local")


def location(path: str | os.PathLike) -> Path:
    """A path to ``path``: a local :class:`pathlib.Path` (``~`` expanded, absolute) or an object storage
    :class:`upath.UPath` (``s3://bucket/key``, ``gs://bucket/key``; listing cache off).

    Raises:
        ValueError: an empty path, or a URI whose scheme is not one of :data:`OBJECT_STORES` (named).
    """
    if isinstance(path, UPath) and is_remote(path):
        return path
    text = os.fspath(path)
    if not text:
        raise ValueError("empty path")
    if not is_remote(text):
        return Path(text.removeprefix("file://")).expanduser().resolve()
    scheme = text.partition("://")[0].lower()
    if scheme not in OBJECT_STORES:
        stores = ", ".join(f"{s}://" for s in OBJECT_STORES)
        raise ValueError(f"{text}: {scheme}:// is not an object store vidlm reads (it reads local paths, {stores})")
    return UPath(text.rstrip("/"), use_listings_cache=False)


def join(root: str | os.PathLike, path: str) -> str:
    """``path`` when it is absolute (a URI or an absolute local path), else ``root / path``, as a string."""
    if is_remote(path) or Path(path).expanduser().is_absolute():
        return path if is_remote(path) else str(Path(path).expanduser())
    return str(location(root) / path)


def open_video(path: str | os.PathLike, block_bytes: int = VIDEO_BLOCK_BYTES):
    """A seekable binary file of a remote video, read in ranged GETs of ``block_bytes`` (never the whole object).

    Raises:
        FileNotFoundError: no object at ``path``.
    """
    return location(path).open("rb", block_size=block_bytes, cache_type="readahead")


def makedirs(path: Path) -> None:
    """Create the local folder ``path`` with its parents; nothing for object storage (prefixes need no folder, and a
    missing bucket stays an error rather than being created)."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def remove(path: Path) -> None:
    """Delete the file or folder (with everything under it) ``path``; nothing if there is none."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def arrow_files(paths: list[Path]) -> tuple[pafs.FileSystem | None, list[str]]:
    """``(filesystem, paths)`` for pyarrow's readers of several files (``pyarrow.dataset.dataset``), which take no
    URIs: ``(None, local paths)``, or pyarrow's own filesystem of the first URI with the paths inside it."""
    if not paths or not is_remote(paths[0]):
        return None, [str(p) for p in paths]
    filesystem, _ = pafs.FileSystem.from_uri(str(paths[0]))
    return filesystem, [str(p).split("://", 1)[1] for p in paths]


def files_digest(
    files: Iterable[Path],
    root: Path,
    content_bytes: int | None = DIGEST_CONTENT_BYTES,
    known: dict[str, list] | None = None,
) -> str:
    """A sha256 (hex) of local ``files`` that changes when any of them does: over each file's path relative to
    ``root``, its size and -- in name order, while the bytes read stay within ``content_bytes`` (``None``: all) --
    its content; a file past that budget counts by its modification time (ns) instead, as ``make`` and ``rsync`` tell
    a changed file. Files rewritten byte for byte keep the digest within the budget, and a corpus of TBs past it
    costs one ``stat`` per file.

    Args:
        known: each file's content hash from an earlier call, by relative path: ``[size, mtime_ns, ctime_ns, inode,
            sha256 hex]``. A file whose four stat fields still match is not read again (as git's index trusts a
            file's stat); the others are read and their entries replaced, and entries of files not in ``files`` are
            dropped. The digest is the same as without it. ``ctime`` changes on every write and cannot be set back,
            so a file rewritten in place with its size and modification time restored is read again.

    Raises:
        FileNotFoundError: a file of ``files`` is gone.
    """
    digest = hashlib.sha256()
    budget = float("inf") if content_bytes is None else content_bytes
    listed = set()
    for path in sorted(files):
        stat = path.stat()
        name = path.relative_to(root).as_posix()
        listed.add(name)
        digest.update(f"{name}\0{stat.st_size}\0".encode())
        if stat.st_size <= budget:
            budget -= stat.st_size
            key = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
            content = _known_hash((known or {}).get(name), key)
            if content is None:
                with path.open("rb") as f:
                    content = hashlib.file_digest(f, "sha256").digest()
                if known is not None:
                    known[name] = [*key, content.hex()]
            digest.update(content)
        else:
            digest.update(f"mtime:{stat.st_mtime_ns}".encode())
    if known is not None:
        for name in set(known) - listed:
            del known[name]
    return digest.hexdigest()
