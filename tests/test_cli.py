"""The `vidlm` command line: doctor, config errors naming the field, submit without a command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from vidlm.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_doctor_reports_engine_and_accelerator_and_passes_here():
    result = runner.invoke(app, ["doctor"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for needle in ("import vllm", "import transformers", "import decord", "accelerator", "engine"):
        assert needle in result.output
    assert "FAIL" not in result.output
    from vidlm.engine import VllmEngineConfig, engine_dtype

    dtype, why = engine_dtype(VllmEngineConfig(), on_gpu=False)  # this machine has no GPU
    assert f"{dtype}: {why}" in " ".join(result.output.replace("│", " ").split())


def test_doctor_fails_with_a_clear_message_when_an_import_breaks(tmp_path):
    (tmp_path / "decord.py").write_text("raise ImportError('decord is broken on purpose')\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "vidlm", "doctor"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 1
    assert "environment is broken" in proc.stdout and "decord is broken on purpose" in proc.stdout


def test_config_command_resolves_yaml_and_overrides():
    result = runner.invoke(
        app, ["config", "features", "-c", str(REPO / "pipelines/configs/features_topa.yaml"), "sampling.num_frames=7"]
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["sampling"] == {**resolved["sampling"], "mode": "fixed", "num_frames": 7}
    assert resolved["encode"]["tower"]["model"] == "topa-llama2-7b"


def test_features_rejects_a_bad_field_before_starting_ray(tmp_path):
    result = runner.invoke(
        app, ["features", str(tmp_path), "--out", str(tmp_path / "o"), "sampling.num_frames=-1"], terminal_width=200
    )
    assert result.exit_code == 2
    assert "sampling.num_frames" in result.output and "greater than 0" in result.output


def test_submit_needs_a_command_and_an_address():
    result = runner.invoke(app, ["submit", "--address", "http://127.0.0.1:1"], terminal_width=200)
    assert result.exit_code == 2 and "nothing to submit" in result.output
    result = runner.invoke(app, ["submit", "--", "vidlm", "doctor"], env={"RAY_ADDRESS": ""}, terminal_width=200)
    assert result.exit_code == 2 and "no cluster address" in result.output


def test_recaption_config_and_bad_input_errors_before_starting_ray(tmp_path):
    result = runner.invoke(
        app,
        [
            "config",
            "recaption",
            "-c",
            str(REPO / "pipelines/configs/recaption_bilingual.yaml"),
            "generation.max_tokens=64",
        ],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["prompts"] == {"caption": "pllava_recaption", "caption_zh": "pllava_recaption_zh"}
    assert resolved["generation"]["max_tokens"] == 64 and resolved["model"] == "smol"
    result = runner.invoke(app, ["recaption", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "manifest not found" in result.output
    result = runner.invoke(app, ["recaption", "http://169.254.169.254/m.csv", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "http:// is not an object store" in result.output
    (tmp_path / "m.txt").write_text("/x.mp4\n")
    result = runner.invoke(app, ["recaption", str(tmp_path / "m.txt"), "--out", str(tmp_path / "o"), "--model", "nope"])
    assert result.exit_code == 2 and "unknown preset 'nope'" in result.output


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    import vidlm

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"vidlm {version('vidlm')}" == f"vidlm {vidlm.__version__}"


def test_exit_codes_two_for_usage_one_for_failures():
    assert runner.invoke(app, ["--log-level", "loud", "doctor"]).exit_code == 2  # a bad option
    assert runner.invoke(app, ["recaption"]).exit_code == 2  # a missing argument
    result = runner.invoke(app, ["config", "recaption", "engine.batch_size=0"], terminal_width=200)
    assert result.exit_code == 2 and "engine.batch_size" in result.output  # a bad config field
    # a cluster that does not answer (a closed loopback port) is a failure, not a usage error
    result = runner.invoke(app, ["deploy", "--address", "http://127.0.0.1:9"], env={"RAY_AUTH_MODE": "disabled"})
    assert result.exit_code == 1 and "127.0.0.1:9" in result.output


def test_log_level_sets_the_vidlm_loggers():
    import logging

    result = runner.invoke(app, ["--log-level", "debug", "config", "features"])
    assert result.exit_code == 0
    assert logging.getLogger("vidlm.cluster").getEffectiveLevel() == logging.DEBUG
    runner.invoke(app, ["--log-level", "warning", "config", "features"])
    assert logging.getLogger("vidlm.cluster").getEffectiveLevel() == logging.WARNING


def test_text_jobs_refuse_models_without_an_llm_of_their_own_and_bad_counts(tmp_path):
    """``--model`` of textvid / synth-qa: a preset whose LLM is not stored alone, an unknown name, a folder that is
    no model, and ``--num`` below 1 are usage errors naming the problem, before Ray starts."""
    cases = [
        (["--model", "tiny"], "has no LLM of its own"),
        (["--model", "pllava-7b"], "has no LLM of its own"),
        (["--model", "no-such-model"], "unknown preset"),
        (["--model", str(tmp_path / ".." / tmp_path.name)], "no config.json"),  # a dotted path to a non-model
        (["--model", str(tmp_path)], "no config.json"),
    ]
    for extra, words in cases:
        result = runner.invoke(app, ["textvid", "--num", "1", "--out", str(tmp_path / "o"), *extra], terminal_width=300)
        assert result.exit_code == 2 and words in " ".join(result.output.split()), (extra, result.output)
    result = runner.invoke(app, ["textvid", "--num", "0", "--out", str(tmp_path / "o")], terminal_width=200)
    assert result.exit_code == 2 and "--num must be at least 1" in result.output


def test_model_json_gives_the_token_arithmetic_and_context():
    result = runner.invoke(app, ["model", "llava-video-7b", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["frames"] == 64 and info["visual_tokens"] == 64 * 169  # LLaVA-Video Table 4: 169 per frame
    assert info["max_position_embeddings"] == 32768 and info["compressor"]["pool_mode"] == "average"
    assert "paper" in info["origin"]
    result = runner.invoke(app, ["model", "llava-video-7b", "--json", "--frames", "110"])
    assert json.loads(result.output)["visual_tokens"] == 18590  # LLaVA-Video §4: "18,590"
    assert runner.invoke(app, ["model", "llava-video-7b", "--frames", "0"]).exit_code == 2
    assert runner.invoke(app, ["model", "no-such-model", "--json"]).exit_code == 2  # a usage error
