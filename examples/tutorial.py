"""The learning loop on planted videos, through vidlm's own commands (``make tutorial``; README "Tutorial").

``python examples/tutorial.py --out runs/tutorial --seed 0 --num 200``

1. ``vidlm planted``: videos whose content is known, train / test split by video, captions and questions;
2. ``vidlm train --config training/configs/video_planted.yaml``: the tiny-video model trained on the training
   videos' frames (tower, projector and LLM) on their captions and questions;
3. ``vidlm eval mc`` scoring (:func:`training.eval.evaluate_mc`) of the export and of the untrained model on the
   held-out videos' questions;
4. ``vidlm recaption --model OUT/train/export`` on the held-out videos through vLLM, each caption scored against
   the planted truth (:func:`pipelines.planted.caption_accuracy`).

Writes ``OUT/report.json`` (``mc_accuracy`` and ``untrained_mc_accuracy`` per task type, scored by the options'
loss as TOPA does; ``caption_attribute_accuracy`` per attribute and for all three; the commands' seconds) and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "training/configs/video_planted.yaml"


def _vidlm(*args: str, log: Path) -> float:
    """Runs ``vidlm ARGS`` (output to ``log``); its wall time in seconds. Raises ``CalledProcessError``."""
    started = time.perf_counter()
    with log.open("w") as f:
        subprocess.run([sys.executable, "-m", "vidlm", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tutorial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=200, help="planted videos (a fifth held out)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    args = parser.parse_args()

    import pyarrow.dataset as pads

    from pipelines.planted import caption_accuracy
    from training.config import TrainConfig
    from training.eval import evaluate_mc
    from vidlm.config import load_config

    overrides = [f"seed={args.seed}", *args.overrides]
    config = load_config(
        TrainConfig, str(REPO / RECIPE), overrides
    )  # the untrained model and the caption prompt are its own
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    planted, train = out / "planted", out / "train"
    seconds = {
        "planted": _vidlm(
            "planted", "--out", str(planted), "--num", str(args.num), "--seed", str(args.seed), log=out / "planted.log"
        )
    }
    seconds["train"] = _vidlm(
        "train",
        "--config",
        RECIPE,
        "--out",
        str(train),
        f"data.train={planted / 'train.csv'}",
        *overrides,
        log=out / "train.log",
    )
    seconds["recaption"] = _vidlm(
        "recaption",
        str(planted / "test.csv"),
        "--out",
        str(out / "captions"),
        "--model",
        str(train / "export"),
        f"prompts={{caption: {config.data.caption_prompt}}}",
        "generation.max_tokens=48",
        log=out / "recaption.log",
    )
    started = time.perf_counter()
    trained = evaluate_mc(train / "export", planted / "test_mc.jsonl", generate=False)
    untrained = evaluate_mc(config.model, planted / "test_mc.jsonl", generate=False)
    seconds["eval"] = time.perf_counter() - started
    scenes = {s["video_id"]: s for s in map(json.loads, (planted / "scenes.jsonl").read_text().splitlines())}
    captions = pads.dataset(out / "captions" / "captions").to_table(columns=["video_id", "caption"]).to_pylist()
    tasks = trained.task_types
    report = {
        "seed": args.seed,
        "videos": args.num,
        "test_questions": trained.n,
        "mc_accuracy": {t: round(trained.accuracy("loss", t), 3) for t in tasks},
        "untrained_mc_accuracy": {t: round(untrained.accuracy("loss", t), 3) for t in tasks},
        "caption_attribute_accuracy": caption_accuracy(captions, scenes),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'task type':<12}{'trained':>9}{'untrained':>11}")
    for t in tasks:
        print(f"{t:<12}{report['mc_accuracy'][t]:>9.3f}{report['untrained_mc_accuracy'][t]:>11.3f}")
    for a, v in report["caption_attribute_accuracy"].items():
        what = "all three" if a == "all" else f"every object's {a}"
        print(f"captions naming {what}: {v:.3f}")
    print(f"{out / 'report.json'}; seconds {report['seconds']}")


if __name__ == "__main__":
    main()
