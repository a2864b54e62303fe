"""What people look at after a recaption run: a static HTML caption browser and a caption-length histogram.

- ``OUT/browser/index.html`` (and ``page-0002.html``...): one card per clip, every clip of the output,
  sorted by clip id: its thumbnail strip, window (seconds), frames and visual tokens, each caption
  column, the manifest's own caption, and the error of a failed clip. Self-contained files (thumbnails
  inlined), so the folder can be copied anywhere or opened from object storage.
- ``OUT/caption_lengths.png``: histogram of caption lengths in words, one series per template (the
  statistic of PLLaVA Fig. 2).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines._common import read_output_columns
from vidlm.storage import makedirs
from vidlm.writers import write_atomic, write_figure

__all__ = ["write_browser", "write_length_histogram", "write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.clip { border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; margin: .6em 0; }
.clip.failed { border-color: #d55; background: #fff6f6; }
.meta { color: #666; font-size: .85em; }
.label { font-weight: 600; font-size: .8em; color: #447; text-transform: uppercase; }
.error { color: #b00; font-family: monospace; white-space: pre-wrap; }
img { display: block; margin: .4em 0; max-width: 100%; }
nav a { margin-right: .5em; }
"""


def _files(captions_dir: Path) -> list[str]:
    return sorted(str(p) for p in captions_dir.glob("*.parquet"))


def _card(row: dict, caption_columns: list[str]) -> str:
    failed = row.get("error_type") is not None
    esc = html.escape
    parts = [f'<div class="clip{" failed" if failed else ""}" id="{esc(row["clip_id"])}">']
    parts.append(f"<b>{esc(row['clip_id'])}</b>")
    start, end = row.get("start_s"), row.get("end_s")
    window = f"{start:.2f} s to {end:.2f} s" if start is not None and end is not None else "whole video"
    meta = [f"video {esc(str(row.get('video_id')))}", window]
    if row.get("num_frames"):
        meta.append(f"{row['num_frames']} frames")
    if row.get("num_visual_tokens"):
        meta.append(f"{row['num_visual_tokens']} visual tokens")
    parts.append(f'<div class="meta">{" | ".join(meta)}</div>')
    if row.get("thumbnail"):
        data = base64.b64encode(row["thumbnail"]).decode()
        parts.append(f'<img alt="frames of {esc(row["clip_id"])}" src="data:image/jpeg;base64,{data}">')
    for col in caption_columns:
        if row.get(col) is not None:
            parts.append(f'<div class="label">{esc(col)}</div><div>{esc(row[col])}</div>')
    if row.get("manifest_caption"):
        parts.append(f'<div class="label">manifest caption</div><div>{esc(row["manifest_caption"])}</div>')
    if failed:
        parts.append(f'<div class="error">{esc(row["error_type"])}: {esc(str(row.get("error")))}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def _pages(files: list[str], clips_per_page: int) -> Iterator[list[dict]]:
    """Rows of every file, ``clips_per_page`` at a time, each page sorted by clip id (one file in memory)."""
    page: list[dict] = []
    for file in files:
        for row in pq.read_table(file).to_pylist():
            page.append(row)
            if len(page) == clips_per_page:
                yield sorted(page, key=lambda r: r["clip_id"])
                page = []
    if page:
        yield sorted(page, key=lambda r: r["clip_id"])


def write_browser(captions_dir: Path, out_dir: Path, caption_columns: list[str], clips_per_page: int) -> list[Path]:
    """Write the HTML caption browser of every clip in ``captions_dir`` to ``out_dir``.

    Pages follow the parquet files (sorted by name) and are sorted by clip id within, so memory holds one
    file and one page whatever the size of the output.

    Args:
        captions_dir: the job's parquet folder.
        out_dir: folder for ``index.html`` (page 1) and ``page-NNNN.html``.
        caption_columns: the caption text columns, in the order shown.
        clips_per_page: clips per page.

    Returns:
        The pages written (none when there is no output).
    """
    files = _files(captions_dir)
    if not files:
        return []
    summary = read_output_columns(captions_dir, ["error_type"]).column("error_type")
    total, failed = len(summary), pc.sum(pc.is_valid(summary)).as_py() or 0
    num_pages = -(-total // clips_per_page)
    names = [out_dir / ("index.html" if i == 0 else f"page-{i + 1:04d}.html") for i in range(num_pages)]
    makedirs(out_dir)
    nav = "<nav>pages: " + "".join(f'<a href="{p.name}">{i + 1}</a>' for i, p in enumerate(names)) + "</nav>"
    for i, (path, rows) in enumerate(zip(names, _pages(files, clips_per_page), strict=True)):
        cards = "\n".join(_card(r, caption_columns) for r in rows)
        title = f"vidlm recaption: {total} clips, {failed} failed (page {i + 1}/{num_pages})"
        write_atomic(
            path,
            f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{nav}\n{cards}\n{nav}</body></html>\n",
        )
    for stale in set(out_dir.glob("*.html")) - set(names):  # pages of an earlier, longer output
        stale.unlink()
    return names


def write_length_histogram(captions_dir: Path, png: Path, caption_columns: list[str]) -> Path | None:
    """Plot the histogram of caption lengths in words, one series per caption column (PLLaVA Fig. 2).

    Returns:
        ``png``, or ``None`` when no clip has a caption.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = _files(captions_dir)
    if not files:
        return None
    table = read_output_columns(captions_dir, caption_columns)
    lengths = {c: [len(t.split()) for t in table.column(c).to_pylist() if t] for c in caption_columns}
    if not any(lengths.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    top = max(max(v) for v in lengths.values() if v)
    bins = list(range(0, top + max(1, top // 30) + 1, max(1, top // 30)))
    for col, values in lengths.items():
        if values:
            ax.hist(values, bins=bins, alpha=0.6, label=f"{col} (mean {sum(values) / len(values):.0f} words)")
    ax.set_xlabel("caption length (words)")
    ax.set_ylabel("clips")
    ax.set_title("caption lengths")
    ax.legend()
    return write_figure(fig, png)


def write_report(out: Path, captions_dir: Path, config) -> dict:
    """Write the browser (``out/browser/``) and the histogram (``out/caption_lengths.png``) of a run.

    Args:
        config: the run's :class:`~pipelines.recaption.RecaptionConfig`.

    Returns:
        ``{"browser": path or None, "histogram": path or None}`` (also written to ``out/report.json``).
    """
    columns = list(config.prompts)
    pages = write_browser(captions_dir, out / "browser", columns, config.report.clips_per_page)
    png = write_length_histogram(captions_dir, out / "caption_lengths.png", columns)
    record = {"browser": str(pages[0]) if pages else None, "histogram": str(png) if png else None}
    write_atomic(out / "report.json", json.dumps(record, indent=2))
    return record
