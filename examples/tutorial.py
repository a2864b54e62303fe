"""The learning loop on planted videos, through vidlm's own commands (``make tutorial``; README "Tutorial").

``python examples/tutorial.py --out runs/tutorial --seed 0 --num 1400 [--test-fraction 0.03] [--max-objects 3]
[--compressor none|pllava|slowfast|topa|mean] [--center-visual-tokens clip|frames|differences]
[--visual-position-embedding] [--region-tokens R] [--[no-]focus-token] [--no-pretrain-tower]
[--compressors pllava,slowfast,topa,mean] [TRAIN_OVERRIDE ...]``

1. ``vidlm planted``: videos of one to three objects whose content is known, train / test split by video, captions
   and questions;
2. ``vidlm train --config training/configs/words_planted.yaml model=OUT/model`` (not with ``--no-pretrain-tower``):
   the tower and projector pre-trained on the training videos' frames and their captions' words (recipe ``words``),
   900 steps of 16 clips, whose export the next steps start from;
   ``vidlm features`` of the training videos with that export's tower (its patch features, float32, the model's
   frame sampling); ``vidlm train --config training/configs/video_planted.yaml model=OUT/words/export`` on them: the
   tutorial's model (:data:`MODEL`) trained on the training videos' captions and questions (the LLM, its input
   embeddings, the tower and projector frozen), each video once; with ``--no-pretrain-tower``, on the decoded frames
   from ``OUT/model``, with the tower, projector and input embeddings trained too (``trainable.vision_tower=full``,
   ``trainable.projector=full``, ``trainable.freeze_input_embeddings=false``);
3. ``vidlm eval mc --option-text`` scoring (:func:`training.eval.evaluate_mc`) of the export and of the untrained
   model on the held-out videos' questions: each question asked open-ended, as the model was trained, the option
   whose words are likeliest its choice;
4. ``vidlm recaption --model OUT/train/export`` on the held-out videos through vLLM, each caption scored against
   the planted truth (:func:`pipelines.planted.caption_accuracy`).

Writes ``OUT/report.json`` (``mc_accuracy`` and ``untrained_mc_accuracy`` per task type, scored by the options'
words; ``caption_attribute_accuracy`` per attribute and for all three; the commands' seconds) and
prints the table. ``--compressors`` runs steps 2-4 once per compressor of :data:`COMPRESSORS` -- the same corpus,
recipe, steps and seed, the tutorial's model with only its compressor changed -- into ``OUT/KIND/`` and adds
the comparison (``compressors``: accuracy per task type, visual tokens per clip, train seconds) to the report.
A rerun into the same ``OUT`` with the same options resumes every step; with other options (another ``--seed``, say)
it first removes what the earlier run wrote there (:func:`_start`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "training/configs/video_planted.yaml"
WORDS_RECIPE = "training/configs/words_planted.yaml"
FEATURES = "pipelines/configs/features_tiny.yaml"

MODEL = {
    "vision_config.image_size": 192,
    "vision_config.patch_size": 16,
    "vision_config.hidden_size": 128,
    "vision_config.intermediate_size": 512,
    "vision_config.num_attention_heads": 4,
    "text_config.initializer_range": 0.02,
    "text_config.num_attention_heads": 4,
    "text_config.num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "text_config.tie_word_embeddings": False,
    "compressor": {"kind": "none"},
    "center_visual_tokens": "clip",
    "visual_position_embedding": False,
    "visual_summary_token": True,
    "visual_motion": True,
    "visual_region_tokens": 3,
    "visual_region_order": "appearance",
    "visual_focus_token": True,
}
"""The tutorial's model: ``tiny-video`` with a finer, wider tower on the planted videos' own 192 px (16 px patches: a 12
x 12 grid, each region of a 3 x 3 split 4 x 4 patches; width 128, 4 heads: with 32 px patches the ``words`` stage
teaches it less shape, 0.875 against 1.000; at 224 px, the frames upsampled to a 14 x 14 grid, it teaches less in more
time, docs/tutorial-findings.md "The tower's input size"), its LLM untied with 4 / 4 heads and initialised as
transformers does (``tiny``'s wide 0.2 makes greedy tokens of a random model vary for the parity tests), and no patch
tokens (``compressor: none``): a clip is 11 tokens -- one summary token (``visual_summary_token``: the projector of the
maximum of the clip's patch features, plus their motion -- ``visual_motion``: each feature channel's spatial
soft-argmax, from the first frame to the last, through a linear layer -- the vector the ``words`` stage aligns with the
caption's words), 3 x 3 region summaries (``visual_region_tokens``: each region's colour, shape and motion in one token,
which the ``words`` stage aligns with one sentence of the caption each; ``visual_region_order: appearance``: those of
the objects first, in the order they appear, so that the caption's k-th sentence reads the k-th region,
docs/tutorial-findings.md "The captions' order") and a focus token (``visual_focus_token``: the
regions weighed by the question's words, so that the LLM reads the object a question names from one token;
docs/tutorial-findings.md, "Several objects" and "The lookup in the connector"). With the 196 patch tokens of PLLaVA's
pooling in front (``--compressor pllava``), one pass of the video recipe reads less shape from the same tokens (0.262
against 0.810 with the 224 px tower, one to three objects). ``--compressor`` puts a paper's patch tokens in front
(:data:`COMPRESSORS`), centred per clip (``center_visual_tokens: clip``: with a tower of random weights, the tokens'
shared part -- the background -- outweighs the objects, and the LLM reads the same input for every clip);
``--center-visual-tokens differences --visual-position-embedding`` (frame differences, and a learned position embedding
per patch after them) lets the LLM learn the sense of a motion from the patch tokens alone, and ``frames`` its axis
(docs/tutorial-findings.md). ``--region-tokens 0 --no-focus-token`` leaves the summary token alone, the model of one
object per video (``--max-objects 1``)."""


COMPRESSORS = {
    "none": {},  # MODEL's own
    "pllava": {"compressor": {"kind": "pllava", "pooling_shape": (4, 7, 7)}},
    "slowfast": {"compressor": {"kind": "slowfast", "slow_stride": 2, "slow_pool": 2, "pool_mode": "average"}},
    "topa": {
        "compressor": {"kind": "global"},
        "projector": "topa_linear",
        "visual_position_embedding": False,
        "visual_summary_token": False,
        "visual_motion": False,
        "visual_region_tokens": 0,
        "visual_focus_token": False,
    },
    "mean": {"compressor": {"kind": "mean"}},
}
"""The model's patch tokens as overrides of :data:`MODEL` (4 frames of a 12 x 12 patch grid): none (:data:`MODEL`'s own,
11 tokens), or the papers' compressors in front of :data:`MODEL`'s summary token, region summaries and focus token
(11 tokens, unless ``--region-tokens`` / ``--focus-token`` change them) but TOPA's: PLLaVA adaptive structure pooling
to ``(4, 7, 7)`` (196 + 11 tokens); LLaVA-Video SlowFast with every 2nd frame slow (pooled 2 x 2 to 6 x 6: 36 tokens)
and the others fast (pooled 4 x 4: 9 tokens), 90 + 11 tokens; TOPA's one token per frame (the pooled embedding, its
linear projector; no patch grid, so no position embedding, summary token, regions or focus token), 4 tokens;
Video-ChatGPT's spatial and temporal means, 144 + 4 + 11 tokens."""


STEPS = ("planted", "words", "features", "train", "recaption")
"""The ``vidlm`` commands the tutorial runs; step ``S`` writes its output to ``OUT/S.log``."""
RUN_RECORD = "tutorial.json"
"""The options of the run an output folder holds (``OUT/tutorial.json``)."""
OUTPUTS = (
    "planted",
    "model",
    "words",
    "features",
    "train",
    "captions",
    *COMPRESSORS,
    "report.json",
    *(f"{step}.log" for step in STEPS),
)
"""What the tutorial writes in its output folder: its steps' folders and logs, a folder per compressor, the report."""


def _start(out: Path, run: dict) -> list[str]:
    """Makes ``out`` hold the run of options ``run`` (JSON-able); the names it removed from ``out``.

    A folder whose :data:`RUN_RECORD` is ``run`` is kept: an interrupted run resumes (``vidlm train`` from its last
    checkpoint, ``vidlm recaption`` from the clips it wrote). Otherwise what an earlier run of other options wrote
    there (:data:`OUTPUTS`; nothing else) is removed first, so each step starts afresh where ``vidlm train`` would
    refuse its checkpoint (another corpus or model at the same paths) and ``vidlm recaption`` its output.
    """
    record = out / RUN_RECORD
    try:
        if json.loads(record.read_text()) == run:
            return []
    except (OSError, ValueError):
        pass
    removed = [name for name in OUTPUTS if (out / name).is_symlink() or (out / name).exists()]
    for name in removed:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run, indent=2) + "\n")
    return removed


def _vidlm(step: str, out: Path, *args: str) -> float:
    """Runs ``vidlm ARGS``, step ``step`` of :data:`STEPS` (output to ``out/STEP.log``); its wall time in seconds.

    Raises:
        subprocess.CalledProcessError: the command failed.
    """
    assert step in STEPS, step
    started = time.perf_counter()
    with (out / f"{step}.log").open("w") as f:
        subprocess.run([sys.executable, "-m", "vidlm", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def _overrides(kind: str, center: str, position: bool, regions: int, focus: bool) -> dict:
    """:data:`MODEL` with ``center_visual_tokens=center``, ``visual_position_embedding=position``,
    ``visual_region_tokens=regions``, ``visual_focus_token=focus`` and the compressor ``kind`` of :data:`COMPRESSORS`
    (which may turn the embedding, the regions and the focus token off): ``tiny-video``'s overrides."""
    mine = {"center_visual_tokens": center, "visual_position_embedding": position, "visual_region_tokens": regions}
    return MODEL | mine | {"visual_focus_token": focus} | COMPRESSORS[kind]


def _model(out: Path, *options) -> str:
    """The model of :func:`_overrides` ``(*options)``, saved in ``out / "model"``; its path."""
    from vidlm.models.presets import build_preset

    model, tokenizer = build_preset("tiny-video", overrides=_overrides(*options))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return str(out / "model")


def _check_model(*options) -> None:
    """Raises ValueError: the model of :func:`_overrides` ``(*options)`` is one ``VidlmConfig`` refuses (regions the
    patch grid does not hold, a focus token without regions, no patch tokens and nothing appended...), before
    anything is planted."""
    from vidlm.models.presets import preset_config

    preset_config("tiny-video", _overrides(*options)).validate_parts()


def learn(
    out: Path,
    planted: Path,
    model: str,
    overrides: list[str],
    caption_prompt: str,
    words: list[str] | None = None,
) -> dict:
    """Steps 2-4 of the module for ``model``: train on ``planted`` (given ``words``, the overrides of the ``words``
    stage: its tower and projector on the captions' words first, then the LLM with those frozen, as the recipe has it;
    otherwise the tower is trained with the rest), then score the export and ``model`` itself.

    Returns:
        ``mc_accuracy`` / ``untrained_mc_accuracy`` (task type -> accuracy by the options' own words, ``vidlm eval
        mc --option-text``), ``mc_letter_accuracy`` (the export by TOPA's letter score, a format the tutorial does
        not train), ``caption_attribute_accuracy``,
        ``visual_tokens`` (per clip), ``test_questions`` and ``seconds`` (per step).
    """
    import pyarrow.dataset as pads

    from pipelines.planted import caption_accuracy
    from training.eval import evaluate_mc
    from vidlm.models.presets import locate_model

    train = out / "train"
    train_data = f"data.train={planted / 'train.csv'}"
    seconds = {}
    # the tower and projector trained with the LLM on the decoded frames, its input embeddings too
    start, random_parts = model, ["trainable.vision_tower=full", "trainable.projector=full"]
    random_parts.append("trainable.freeze_input_embeddings=false")
    if words is not None:
        folder = out / "words"
        args = ("train", "--config", WORDS_RECIPE, "--out", str(folder), train_data, f"model={model}", *words)
        seconds["words"] = _vidlm("words", out, *args, "export.dtype=float32")
        start, random_parts = str(folder / "export"), []
        sampling = [f"sampling.{k}={v}" for k, v in locate_model(start)[1].sampling.items()]  # the model's frames
        args = ("features", str(planted / "train.csv"), "--out", str(out / "features"), "--config", FEATURES)
        tower = (f"encode.tower.model={start}", "encode.dtype=float32")  # its frozen tower's numbers, exactly
        seconds["features"] = _vidlm("features", out, *args, *sampling, *tower)
        train_data = f"data.train={out / 'features' / 'features'}"
    seconds["train"] = _vidlm(
        "train",
        out,
        "train",
        "--config",
        RECIPE,
        "--out",
        str(train),
        train_data,
        f"model={start}",
        *random_parts,
        *overrides,
    )
    seconds["recaption"] = _vidlm(
        "recaption",
        out,
        "recaption",
        str(planted / "test.csv"),
        "--out",
        str(out / "captions"),
        "--model",
        str(train / "export"),
        f"prompts={{caption: {caption_prompt}}}",
        "generation.max_tokens=48",
    )
    started = time.perf_counter()
    trained = evaluate_mc(train / "export", planted / "test_mc.jsonl", generate=False, option_text=True)
    untrained = evaluate_mc(model, planted / "test_mc.jsonl", generate=False, option_text=True)
    seconds["eval"] = time.perf_counter() - started
    scenes = {s["video_id"]: s for s in map(json.loads, (planted / "scenes.jsonl").read_text().splitlines())}
    captions = pads.dataset(out / "captions" / "captions").to_table(columns=["video_id", "caption"]).to_pylist()
    config = locate_model(model)[1]
    return {
        "test_questions": trained.n,
        "visual_tokens": config.num_visual_tokens(config.sampling_config.max_frames_per_clip()),
        "mc_accuracy": {t: round(trained.accuracy("option", t), 3) for t in trained.task_types},
        "untrained_mc_accuracy": {t: round(untrained.accuracy("option", t), 3) for t in trained.task_types},
        "mc_letter_accuracy": {t: round(trained.accuracy("loss", t), 3) for t in trained.task_types},
        "caption_attribute_accuracy": caption_accuracy(captions, scenes),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _print(report: dict) -> None:
    tasks = list(report["mc_accuracy"])
    print(f"{'task type':<12}{'trained':>9}{'untrained':>11}{'letters':>9}")
    for t in tasks:
        accuracy = (report[k][t] for k in ("mc_accuracy", "untrained_mc_accuracy", "mc_letter_accuracy"))
        print(f"{t:<12}" + "".join(f"{a:>{w}.3f}" for a, w in zip(accuracy, (9, 11, 9), strict=True)))
    for a, v in report["caption_attribute_accuracy"].items():
        what = "all three" if a == "all" else f"every object's {a}"
        print(f"captions naming {what}: {v:.3f}")


def _print_compressors(report: dict) -> None:
    tasks = list(report["mc_accuracy"])
    print(f"\n{'compressor':<10}{'tokens':>7}" + "".join(f"{t:>10}" for t in tasks) + f"{'captions':>10}{'train s':>9}")
    for kind, r in report["compressors"].items():
        accuracy = "".join(f"{r['mc_accuracy'].get(t, float('nan')):>10.3f}" for t in tasks)
        print(f"{kind:<10}{r['visual_tokens']:>7}{accuracy}{r['captions_all']:>10.3f}{r['seconds']['train']:>9.0f}")


def main() -> None:
    from vidlm.models.video_llm import CENTERINGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "tutorial")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=1400, help="planted videos (--test-fraction of them held out)")
    parser.add_argument("--test-fraction", type=float, default=0.03, help="share of the videos held out")
    parser.add_argument(
        "--max-objects", type=int, default=3, help="objects per video: 1 to this (planted's max_objects)"
    )
    parser.add_argument(
        "--compressor",
        choices=COMPRESSORS,
        default="none",
        help="the model's patch tokens: none (MODEL's own) or a paper's compressor (COMPRESSORS) in front of the rest",
    )
    parser.add_argument(
        "--center-visual-tokens",
        choices=CENTERINGS,
        default=MODEL["center_visual_tokens"],
        help="the model's centring of its visual tokens (VidlmConfig.center_visual_tokens)",
    )
    parser.add_argument(
        "--visual-position-embedding",
        action=argparse.BooleanOptionalAction,
        default=MODEL["visual_position_embedding"],
        help="a learned position embedding per patch after the centring (VidlmConfig.visual_position_embedding)",
    )
    parser.add_argument(
        "--region-tokens",
        type=int,
        default=MODEL["visual_region_tokens"],
        help="R: R x R region summaries per clip, for several objects (VidlmConfig.visual_region_tokens)",
    )
    parser.add_argument(
        "--focus-token",
        action=argparse.BooleanOptionalAction,
        default=MODEL["visual_focus_token"],
        help="one more token: the regions weighed by the question's words (VidlmConfig.visual_focus_token)",
    )
    parser.add_argument(
        "--pretrain-tower",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"pre-train the tower and projector on the captions' words first ({WORDS_RECIPE})",
    )
    parser.add_argument(
        "--words-steps",
        type=int,
        help=f"steps of the words stage (its optim.max_steps; {WORDS_RECIPE}'s own by default)",
    )
    parser.add_argument(
        "--compressors", default="", help=f"comma-separated, of {', '.join(COMPRESSORS)}: also compare these"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    args = parser.parse_args()
    if args.words_steps is not None and not args.pretrain_tower:
        parser.error("--words-steps: the steps of the words stage, not with --no-pretrain-tower")
    kinds = [k for k in args.compressors.split(",") if k]
    if unknown := set(kinds) - set(COMPRESSORS):
        parser.error(f"unknown compressors {sorted(unknown)}; known: {', '.join(COMPRESSORS)}")

    from pipelines.planted import PlantedConfig
    from training.config import TrainConfig
    from vidlm.config import ConfigError, load_config

    overrides = [f"seed={args.seed}", *args.overrides]
    steps = [f"optim.max_steps={args.words_steps}"] if args.words_steps is not None else []
    seeds = [o for o in overrides if o.startswith("seed=")]
    words = [*seeds, *steps] if args.pretrain_tower else None  # the words stage's overrides
    scenes = [f"max_objects={args.max_objects}", f"test_fraction={args.test_fraction}"]
    try:
        load_config(PlantedConfig, None, scenes)
        options = (args.compressor, args.center_visual_tokens, args.visual_position_embedding, args.region_tokens)
        _check_model(*options, args.focus_token)
        config = load_config(TrainConfig, str(REPO / RECIPE), overrides)  # the caption prompt is the recipe's
        if words is not None:
            load_config(TrainConfig, str(REPO / WORDS_RECIPE), words)
    except (ConfigError, ValueError) as e:
        parser.error(str(e))
    out = args.out.resolve()
    run = {k: v for k, v in vars(args).items() if k != "out"}
    if removed := _start(out, run):
        print(f"{out} held a run of other options: removed its {', '.join(removed)}; this run starts afresh")
    planted = out / "planted"
    started = time.perf_counter()
    _vidlm(
        "planted",
        out,
        "planted",
        "--out",
        str(planted),
        "--num",
        str(args.num),
        "--seed",
        str(args.seed),
        *scenes,
    )
    report = {
        "seed": args.seed,
        "videos": args.num,
        "test_fraction": args.test_fraction,
        "max_objects": args.max_objects,
    }
    report["compressor"] = args.compressor
    report["center_visual_tokens"] = args.center_visual_tokens
    report["visual_position_embedding"] = args.visual_position_embedding
    report["region_tokens"] = args.region_tokens
    report["focus_token"] = args.focus_token
    report["pretrain_tower"] = args.pretrain_tower
    report["planted_seconds"] = round(time.perf_counter() - started, 1)
    prompt = config.data.caption_prompt
    report |= learn(out, planted, _model(out, *options, args.focus_token), overrides, prompt, words)
    _print(report)
    if kinds:
        report["compressors"] = {}
        for kind in kinds:
            if kind == args.compressor:
                result = report
            else:
                model = _model(out / kind, kind, *options[1:], args.focus_token)  # only the compressor changes
                result = learn(out / kind, planted, model, overrides, prompt, words)
            report["compressors"][kind] = {k: result[k] for k in ("visual_tokens", "mc_accuracy", "seconds")}
            report["compressors"][kind]["captions_all"] = result["caption_attribute_accuracy"]["all"]
        _print_compressors(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{out / 'report.json'}; seconds {report['seconds']}")


if __name__ == "__main__":
    main()
