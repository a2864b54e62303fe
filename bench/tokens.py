"""Visual tokens per video, and what one prefill costs, per token scheme: ``python bench/tokens.py``.

1. Plot (PNG, ``--out``, default ``docs/tokens.png``): LLM tokens a video becomes against its frame count
   for n-frame (every patch), PLLaVA adaptive structure pooling (16x12x12), LLaVA-Video SlowFast
   (s=1 and s=3, p=2) on the 24x24 grid of CLIP ViT-L/14-336 (SlowFast's own 27x27 SigLIP grid is the
   dashed line) and TOPA (one token per frame), all from :func:`vidlm.models.compressors.num_visual_tokens`.
2. Table: one prefill (tower + projector + compressor + LLM forward over the whole prompt) per scheme on
   the ``smol`` model (SmolLM2-135M) with 16 frames at 224 px, seconds and the ratio to the n-frame
   baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from vidlm.models.compressors import CompressorConfig, num_visual_tokens  # noqa: E402
from vidlm.models.presets import PLLAVA_POOLING_SHAPE  # noqa: E402

SCHEMES = {
    "n-frame": {"kind": "nframe"},
    "PLLaVA 16x12x12": {"kind": "pllava", "pooling_shape": PLLAVA_POOLING_SHAPE},
    "SlowFast s=1 p=2": {"kind": "slowfast", "slow_stride": 1, "slow_pool": 2},
    "SlowFast s=3 p=2": {"kind": "slowfast", "slow_stride": 3, "slow_pool": 2},
    "TOPA (1 per frame)": {"kind": "global"},
}


def plot(out: Path, frames: list[int]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, fields in SCHEMES.items():
        ax.plot(frames, [num_visual_tokens(CompressorConfig(grid=(24, 24), **fields), t) for t in frames], label=label)
    siglip = CompressorConfig(grid=(27, 27), kind="slowfast", slow_stride=3, slow_pool=2)
    ax.plot(frames, [num_visual_tokens(siglip, t) for t in frames], "--", label="SlowFast s=3, SigLIP 27x27")
    ax.set(xlabel="frames per video", ylabel="visual tokens", yscale="log", title="Visual tokens per video")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")


def time_prefills(num_frames: int, repeats: int) -> list[tuple[str, int, float]]:
    from vidlm.models.presets import build_preset
    from vidlm.models.processing import expand_video_tokens

    rows = []
    frames = np.random.default_rng(0).integers(0, 256, (num_frames, 224, 224, 3), dtype=np.uint8)
    overrides = {
        "n-frame": {"compressor": {"kind": "nframe"}},
        "PLLaVA 16x4x4": {"compressor": {"kind": "pllava", "pooling_shape": (16, 4, 4)}},
        "SlowFast s=1 p=2": {"compressor": {"kind": "slowfast", "slow_stride": 1, "slow_pool": 2}},
        "SlowFast s=3 p=2": {"compressor": {"kind": "slowfast", "slow_stride": 3, "slow_pool": 2}},
        "TOPA": {"compressor": {"kind": "global"}, "projector": "topa_linear", "sampling": {"num_frames": num_frames}},
    }
    for label, fields in overrides.items():
        model, tokenizer = build_preset("smol", fields)
        vid = model.config.video_token_index
        n = model.config.num_visual_tokens(num_frames)
        ids = torch.tensor([expand_video_tokens(tokenizer("Describe <video> now.")["input_ids"], vid, n)])
        pixels = model.preprocess(frames)[None]
        times = []
        with torch.inference_mode():
            model(input_ids=ids, pixel_values_videos=pixels, logits_to_keep=1)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=ids, pixel_values_videos=pixels, logits_to_keep=1)
                times.append(time.perf_counter() - start)
        rows.append((label, n, statistics.median(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/tokens.png"))
    parser.add_argument("--frames", type=int, default=16, help="frames per video for the prefill timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    plot(args.out, list(range(1, 129)))
    console = Console()
    console.print(f"plot written to {args.out}")
    rows = time_prefills(args.frames, args.repeats)
    base = rows[0][2]
    table = Table(title=f"one prefill on CPU, smol (SmolLM2-135M), {args.frames} frames at 224 px")
    for col in ("scheme", "visual tokens", "prefill s", "vs n-frame"):
        table.add_column(col)
    for label, n, seconds in rows:
        table.add_row(label, str(n), f"{seconds:.3f}", f"{seconds / base:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
