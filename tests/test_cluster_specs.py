"""The specs in ``cluster/`` deploy: each KubeRay manifest validates against the ``ray.io/v1`` CRD schemas in
``../shared/kuberay-crds/`` (unknown fields refused, as ``kubectl apply``'s strict field validation does), the Serve
config inside the RayService against Ray's ``ServeDeploySchema``, the cluster launcher YAML against Ray's own
launcher schema, every entrypoint against the ``vidlm`` command line, and the images are the Dockerfile's."""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted((REPO / "cluster").glob("kuberay-*.yaml"))
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


def _strict(schema):
    """The schema with ``additionalProperties: false`` on every object that lists its properties and does not keep
    unknown fields (``x-kubernetes-preserve-unknown-fields``): a misspelt field is an error, not silently pruned."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-1.4 MB of YAML
    crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(v1["schema"]["openAPIV3Schema"])


def _cluster(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def _containers(manifest: dict) -> list[tuple[str, dict, dict]]:
    """``(group, pod spec, container)`` of every pod template in a manifest."""
    cluster = _cluster(manifest)
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd(path):
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip("../shared/kuberay-crds is not next to this checkout")
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, _crd_schema(manifest["kind"]))
    broken = json.loads(json.dumps(manifest))
    _containers(broken)[0][2]["imagePullPolicyy"] = "Always"  # a misspelt field: the check can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _crd_schema(manifest["kind"]))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_run_the_dockerfile_image_with_shared_memory_on_gpus_and_no_local_working_dir(path):
    text = path.read_text()
    manifest = yaml.safe_load(text)
    base = re.search(r"^FROM rayproject/ray:(\S+)-py311-gpu$", (REPO / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == version("ray") == _cluster(manifest)["rayVersion"]
    for group, pod, container in _containers(manifest):
        assert container["image"] == f"vidlm:{version('vidlm')}", (group, container["image"])
        if "nvidia.com/gpu" in container.get("resources", {}).get("limits", {}):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}, group
    assert "working_dir" not in text  # Serve takes remote URIs only there; the image holds the code


def test_the_rayservice_serve_config_is_a_serve_deploy_schema_and_builds_the_endpoint_config():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import ServeConfig
    from vidlm.config import validate_config

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay-rayservice.yaml").read_text())
    serve = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "serving.app:app_builder" and not app.runtime_env
    config = validate_config(ServeConfig, app.args)
    gpu = [c for _, _, c in _containers(manifest) if "nvidia.com/gpu" in c["resources"]["limits"]]
    assert config.engine.accelerator == "gpu" and gpu  # the engines ask for GPUs the worker groups have
    assert config.engine.tensor_parallel_size <= int(gpu[0]["resources"]["limits"]["nvidia.com/gpu"])


def test_the_cluster_launcher_yaml_validates_against_ray_s_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    launcher = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(launcher, schema)
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{version('ray')}-")  # ray-ml is not published
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**launcher, "max_workers": "many"}, schema)


def _entrypoints() -> list[tuple[str, list[str]]]:
    out = []
    for path in MANIFESTS:
        manifest = yaml.safe_load(path.read_text())
        if "entrypoint" in manifest["spec"]:
            out.append((path.name, shlex.split(manifest["spec"]["entrypoint"])))
    launcher = (REPO / "cluster" / "ray-cluster.yaml").read_text()
    submit = re.search(r"-- \\\n#\s+(vidlm (?:.+\\\n#)*.+)$", launcher, re.M)  # lines continued with \\
    out.append(("ray-cluster.yaml", shlex.split(submit.group(1).replace("\\\n#", " "))))
    return out


def _node_groups(name: str) -> list[dict[str, str]]:
    """The Ray node labels of each worker group / node type of a manifest (the launcher YAML for ray-cluster.yaml)."""
    manifest = yaml.safe_load((REPO / "cluster" / name).read_text())
    if name == "ray-cluster.yaml":
        types = manifest["available_node_types"]
        return [t.get("labels", {}) for n, t in types.items() if n != manifest["head_node_type"]]
    return [group.get("labels", {}) for group in _cluster(manifest)["workerGroupSpecs"]]


def _assert_placements_match_a_node_group(name: str, config) -> None:
    """Every stage's ``placement.label_selector`` in an entrypoint's config is met by one of the manifest's groups
    (equality selectors, the ones the specs use), so no stage waits forever for a node that never comes."""
    from vidlm.cluster import Placement

    def placements(section, path=""):
        for field, value in section:
            if isinstance(value, Placement):
                yield f"{path}{field}", value
            elif hasattr(value, "model_fields"):
                yield from placements(value, f"{path}{field}.")

    groups = _node_groups(name)
    for where, placement in placements(config):
        wanted = placement.label_selector
        assert any(all(g.get(k) == v for k, v in wanted.items()) for g in groups), (name, where, wanted, groups)


@pytest.mark.parametrize(("name", "argv"), _entrypoints(), ids=[name for name, _ in _entrypoints()])
def test_every_entrypoint_parses_with_the_vidlm_command_line(name, argv):
    """The command line parses (click, no job run): the command, its options and arguments; only the cluster's own
    paths (/mnt/shared...) may be missing here; the --config file is the repository's."""
    import typer

    from vidlm.cli import app
    from vidlm.config import load_config
    from vidlm.jobs import registered_jobs

    if argv[:3] == ["python", "-m", "vidlm"]:
        argv = argv[3:]
    else:
        assert argv[0] == "vidlm", argv
        argv = argv[1:]
    command, ctx, name_ = typer.main.get_command(app), None, "vidlm"
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")  # typer's click
    while hasattr(command, "list_commands"):  # a group: vidlm features ... / vidlm eval mc ...
        ctx = typer.Context(command, info_name=name_, parent=ctx)
        name_, argv = argv[0], argv[1:]
        command = command.get_command(ctx, name_)
        assert command is not None, (name, name_)
    try:
        command.make_context(name_, list(argv), parent=ctx)
    except typer.BadParameter as err:  # a path of the cluster's storage; anything else is a broken entrypoint
        assert "does not exist" in str(err) and "/mnt/shared" in str(err), (name, err)
    config_class = registered_jobs()[name_].config_class()
    if config_class is not None:  # the job's config file (the image's, the repository's) and overrides load
        path = argv[argv.index("--config") + 1] if "--config" in argv else None
        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        config = load_config(config_class, REPO / path if path else None, overrides)
        _assert_placements_match_a_node_group(name, config)
    with pytest.raises(usage_error):  # the check can fail: a missing argument is refused
        command.make_context(name_, [], parent=ctx)


def test_the_grafana_dashboard_charts_every_vidlm_metric_and_only_those():
    """``cluster/grafana-vidlm.json``: each query's ``ray_vidlm_*`` series is one of :mod:`vidlm.metrics` (with the
    suffix Prometheus gives its kind), and each of those is charted."""
    from vidlm.metrics import METRIC_NAMES

    dashboard = json.loads((REPO / "cluster" / "grafana-vidlm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all(p["datasource"]["type"] == "prometheus" for p in dashboard["panels"] if "targets" in p)
    charted = set()
    for expr in exprs:
        for series in re.findall(r"\bray_(vidlm_\w+)", expr):
            name = re.sub(r"_(total|bucket|count|sum)$", "", series)
            assert name in METRIC_NAMES, f"{series} in {expr!r} is no vidlm metric"
            charted.add(name)
    assert charted == set(METRIC_NAMES)
