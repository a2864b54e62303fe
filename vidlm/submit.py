"""Submit any ``vidlm`` command to a Ray cluster with the Ray Jobs SDK, stream its logs, return its status.

The repository is uploaded as the job's ``working_dir`` (so ``vidlm``, ``pipelines`` and the YAML
configs are importable on every node); ``pip`` requirements, when given, are installed into the job's
runtime env. The cluster image is expected to carry the heavy dependencies (torch, vLLM, Ray): see
``cluster/``. Paths in the command are read on the cluster, so ``--out`` must be storage the cluster
reaches (an absolute path on a shared file system).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["WORKING_DIR_EXCLUDES", "entrypoint_for", "submit_job", "use_token_auth_if_available"]

AGENT_WAIT_S = 60.0
"""Seconds to wait for the job agent of a head that has just started ("No available agent")."""

WORKING_DIR_EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]


def entrypoint_for(command: list[str]) -> str:
    """Shell entrypoint for a command line: a leading ``vidlm`` runs as ``python -m vidlm``.

    Raises:
        ValueError: an empty command.
    """
    if not command:
        raise ValueError("empty command")
    if command[0] == "vidlm":
        command = ["python", "-m", "vidlm", *command[1:]]
    return shlex.join(command)


def use_token_auth_if_available() -> None:
    """Send the cluster's auth token when one is on this machine, as ``ray.init`` does.

    Ray >= 2.5x starts local clusters with token auth and saves the token in ``~/.ray/auth_token``;
    the Jobs client only sends it when ``RAY_AUTH_MODE=token``. An explicit ``RAY_AUTH_MODE`` wins.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


async def _stream(client, job_id: str, echo: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):
        echo(lines.rstrip("\n"))


def submit_job(
    command: list[str],
    address: str,
    working_dir: Path,
    pip: list[str] | None = None,
    wait: bool = True,
    echo: Callable[[str], None] = print,
) -> str:
    """Submit ``command`` as a Ray job.

    Args:
        command: e.g. ``["vidlm", "features", "/data/m.csv", "--out", "/data/features"]``.
        address: the Ray dashboard's address, ``http://HEAD:8265``.
        working_dir: folder uploaded as the job's working dir (the repository).
        pip: extra pip requirements for the job's runtime env.
        wait: stream the job's logs until it ends.
        echo: where log lines and status go.

    Returns:
        The job's final status name (``SUCCEEDED``, ``FAILED``, ``STOPPED``), or its current one when
        ``wait`` is false.

    Raises:
        ConnectionError: no Ray dashboard answers at ``address`` (raised by the Ray Jobs SDK).
        RuntimeError: the cluster refused the job (after waiting up to :data:`AGENT_WAIT_S` for its job agent).
    """
    runtime_env: dict = {"working_dir": str(working_dir.resolve()), "excludes": WORKING_DIR_EXCLUDES}
    if pip:
        runtime_env["pip"] = list(pip)
    use_token_auth_if_available()  # before Ray is imported: it reads RAY_AUTH_MODE once
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint_for(command), runtime_env=runtime_env)
            break
        except RuntimeError as err:  # a head that has just started answers 500 until its job agent is up
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    echo(f"submitted {job_id}: {entrypoint_for(command)}")
    if not wait:
        return client.get_job_status(job_id).value
    asyncio.run(_stream(client, job_id, echo))
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status is final
        asyncio.run(asyncio.sleep(0.5))
        status = client.get_job_status(job_id)
    echo(f"job {job_id}: {status.value}")
    return status.value
