"""The Ray cluster a job runs on: connecting or starting one, its CPU budget, GPUs and engine count.

Every job (the Ray Data pipelines, training, the endpoint) starts Ray through :func:`init_ray`, so a laptop and a
cluster in ``RAY_ADDRESS`` take the same path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILTER_CPUS",
    "READ_TASK_CPUS",
    "check_cpu_budget",
    "init_ray",
    "num_gpus_in_cluster",
    "resuming",
]


CHECKPOINT_FILTER_CPUS = 1.0
"""CPUs that Ray Data's checkpoint-filter actor reserves on a resumed run (its default for actors)."""


READ_TASK_CPUS = 1.0
"""CPUs a Ray Data read task reserves (its default for tasks)."""


def resuming(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint of an earlier run (so Ray Data will start its checkpoint filter)."""
    return any((out / "_checkpoint").glob("*"))


def init_ray() -> bool:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local one.

    Returns:
        True when the cluster is local to this process (started here, or by the caller's ``ray.init``
        without an address), False for a remote cluster, which may still autoscale.

    A local cluster gets one logical CPU more than the machine has: on a resumed run, Ray Data's
    checkpoint filter holds an actor with one CPU reserved that does almost no work, and on a
    2-core laptop that reservation plus one encode actor would leave no CPU for decoding.

    A local cluster runs its workers at normal priority (``RAY_worker_niceness=0``, as Ray Jobs run
    drivers) and without the dashboard unless ``VIDLM_RAY_DASHBOARD=1``. Ray's default nice 15 for
    workers makes an engine whose OpenMP threads span every core wait on the driver, the dashboard
    (up to half a core on a laptop) and Ray's own processes.
    """
    remote = bool(os.environ.get("RAY_ADDRESS"))
    if ray.is_initialized():
        return not remote
    if remote:
        ray.init()
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet this call starts
        ray.init(
            num_cpus=(os.cpu_count() or 1) + int(CHECKPOINT_FILTER_CPUS),
            include_dashboard=os.environ.get("VIDLM_RAY_DASHBOARD") == "1",
        )
    return not remote


def check_cpu_budget(stages: dict[str, float], strict: bool, out: Path) -> None:
    """Refuse a plan whose stages cannot all hold their CPUs at once (Ray would wait forever).

    Args:
        stages: CPUs each stage holds at the same time, e.g. ``{"encode actors": 2, "one decode task": 1}``.
        strict: raise (a fixed local cluster); otherwise only warn (a remote cluster may autoscale).
        out: the job's output folder: a resumed run (a checkpoint under it) also holds the filter's CPU.

    Raises:
        ValueError: ``strict`` and the cluster has fewer CPUs than the stages plus the checkpoint filter need.
    """
    have = ray.cluster_resources().get("CPU", 0)
    need = dict(stages)
    if resuming(out):
        need["Ray Data checkpoint filter (resumed run)"] = CHECKPOINT_FILTER_CPUS
    if sum(need.values()) > have:
        parts = ", ".join(f"{k} {v:g}" for k, v in need.items())
        message = (
            f"the cluster has {have:g} CPUs but this job holds {sum(need.values()):g} at once ({parts}); "
            "lower encode.num_actors / encode.num_cpus / decode.num_cpus, or add CPUs"
        )
        if strict:
            raise ValueError(message)
        logger.warning("%s (continuing: the cluster may scale up)", message)


def num_gpus_in_cluster() -> int:
    """GPUs the connected Ray cluster has (0 on a laptop or CPU cluster)."""
    return int(ray.cluster_resources().get("GPU", 0))
