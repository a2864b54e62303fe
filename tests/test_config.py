"""Config loading: every YAML shipped in the repo loads, overrides apply, errors name the field."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.features import FeaturesConfig
from pipelines.recaption import RecaptionConfig
from pipelines.synth_captions import SynthCaptionsConfig
from pipelines.synth_qa import SynthQAConfig
from pipelines.textvid import TextVidConfig
from serving.app import IMPORT_PATH, ServeConfig, serve_config
from vidlm.config import ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
JOB_CONFIGS = {
    "features": FeaturesConfig,
    "recaption": RecaptionConfig,
    "serve": ServeConfig,
    "deploy": ServeConfig,
    "textvid": TextVidConfig,
    "synth-qa": SynthQAConfig,
    "synth-captions": SynthCaptionsConfig,
}


def _job_yamls() -> list[Path]:
    return sorted([*(REPO / "pipelines" / "configs").glob("*.yaml"), *(REPO / "serving" / "configs").glob("*.yaml")])


def _all_yamls() -> list[Path]:
    skip = {".venv", "runs", ".git"}
    return sorted(p for p in REPO.rglob("*.yaml") if not skip & set(p.relative_to(REPO).parts))


@pytest.mark.parametrize("path", _job_yamls(), ids=lambda p: p.name)
def test_every_job_yaml_validates_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# vidlm "), f"{path.name} must open with the command that runs it"
    job = first.split()[2]
    cfg = load_config(JOB_CONFIGS[job], path)
    assert isinstance(cfg, JOB_CONFIGS[job])


@pytest.mark.parametrize("path", _all_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_in_the_repo_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", sorted((REPO / "cluster").glob("kuberay-rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_entrypoint_runs_a_vidlm_job_with_a_shipped_config(path):
    spec = yaml.safe_load(path.read_text())
    argv = shlex.split(spec["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "vidlm"]
    config = argv[argv.index("--config") + 1]
    load_config(JOB_CONFIGS[argv[3]], REPO / config)


def test_rayservice_serves_the_shipped_gpu_config_through_the_app_builder():
    spec = yaml.safe_load((REPO / "cluster" / "kuberay-rayservice.yaml").read_text())
    serve = yaml.safe_load(spec["spec"]["serveConfigV2"])
    (application,) = serve["applications"]
    assert application["import_path"] == IMPORT_PATH
    module, _, name = IMPORT_PATH.partition(":")
    assert callable(getattr(__import__(module, fromlist=[name]), name))
    shipped = load_config(ServeConfig, REPO / "serving" / "configs" / "gpu.yaml")
    assert ServeConfig.model_validate(application["args"]) == shipped
    # what `vidlm deploy` sends is the same application
    sent = serve_config(shipped, working_dir=application.get("runtime_env", {}).get("working_dir"))["applications"][0]
    assert ServeConfig.model_validate(sent["args"]) == shipped
    assert {k: v for k, v in sent.items() if k != "args"} == {k: v for k, v in application.items() if k != "args"}


def test_overrides_are_parsed_as_yaml_and_nest():
    cfg = load_config(FeaturesConfig, None, ["sampling.num_frames=8", "encode.tower.model=smol", "sampling.mode=fps"])
    assert cfg.sampling.num_frames == 8 and cfg.sampling.mode == "fps"
    assert cfg.encode.tower.model == "smol"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


@pytest.mark.parametrize(
    "override, field",
    [
        ("sampling.num_frames=0", "sampling.num_frames"),
        ("sampling.mode=sometimes", "sampling.mode"),
        ("encode.tower.nmae=x", "encode.tower.nmae"),
        ("decode.batch_size=many", "decode.batch_size"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(FeaturesConfig, None, [override])


def test_override_without_equals_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(FeaturesConfig, None, ["sampling.num_frames"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(FeaturesConfig, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(FeaturesConfig, tmp_path / "list.yaml")


def test_configs_are_frozen():
    cfg = load_config(FeaturesConfig)
    with pytest.raises(ValueError):
        cfg.sampling.num_frames = 3


def test_a_partial_override_keeps_the_job_s_own_section_defaults():
    """Jobs share section classes with their own defaults (TextVid samples 1024 tokens at temperature 0.7, the
    class says 256 greedy); setting one field keeps the job's others, and a plain mapping field is replaced."""
    textvid = load_config(TextVidConfig, None, ["generation.temperature=0"])
    assert (textvid.generation.max_tokens, textvid.generation.temperature, textvid.generation.top_p) == (1024, 0, 0.95)
    assert textvid.engine.max_concurrent_batches == 8
    assert load_config(SynthCaptionsConfig, None, ["engine.num_cpus=2"]).engine.batch_size == 4
    assert load_config(RecaptionConfig, None, ["prompts={zh: pllava_recaption_zh}"]).prompts == {
        "zh": "pllava_recaption_zh"
    }
