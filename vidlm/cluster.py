"""The Ray cluster a job runs on: connecting or starting one, its CPU budget, GPUs, where stages run, and a local
multi-node cluster to try all that on one machine.

Every job (the Ray Data pipelines, training, the endpoint) starts Ray through :func:`init_ray`, so a laptop and a
cluster in ``RAY_ADDRESS`` take the same path.

Where a stage runs is configuration (:class:`Placement`): Ray label selectors on node labels (``vidlm/node-type``
on the nodes of :func:`start_local_cluster`, the KubeRay worker groups' ``labels``) and custom resources.

A lost node costs nothing but time: Ray Data runs the tasks that ran there again (``decode.max_retries`` times at
most) and restarts the actors (its defaults ``max_restarts=-1``, ``max_task_retries=-1``), and the job's summary
counts the retried tasks (:func:`retried_tasks`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from pydantic import Field, field_validator

from vidlm.config import Section

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILTER_CPUS",
    "DEFAULT_LOCAL_NODES",
    "FAST_NODE_DEATH",
    "NODE_TYPE_LABEL",
    "READ_TASK_CPUS",
    "LocalNode",
    "LocalCluster",
    "Placement",
    "check_cpu_budget",
    "init_ray",
    "num_gpus_in_cluster",
    "retried_tasks",
    "resuming",
    "start_local_cluster",
]


CHECKPOINT_FILTER_CPUS = 1.0
"""CPUs that Ray Data's checkpoint-filter actor reserves on a resumed run (its default for actors)."""


READ_TASK_CPUS = 1.0
"""CPUs a Ray Data read task reserves (its default for tasks)."""


def resuming(out: Path) -> bool:
    """Whether ``out`` holds a checkpoint of an earlier run (so Ray Data will start its checkpoint filter)."""
    return any((out / "_checkpoint").glob("*"))


def init_ray(running: bool = False) -> bool:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local one (even where ``ray start`` or ``vidlm cluster
    local`` runs a cluster on this machine: only ``RAY_ADDRESS`` sends a job to a cluster).

    With ``running``, a job that needs what another process started (``vidlm recaption --serve`` needs the app
    ``vidlm serve`` runs) joins the cluster ``ray start`` runs on this machine (``address="auto"``) when
    ``RAY_ADDRESS`` is unset, and raises ``ConnectionError`` when there is none: a cluster that ``vidlm serve``
    started for itself is not reachable from another process.

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
    elif running:
        try:
            ray.init(address="auto")
        except ConnectionError as err:
            raise ConnectionError(
                f"no Ray cluster to join ({err}): run the app and this job on one, e.g. `vidlm cluster local`, then "
                "RAY_ADDRESS=<the address it prints> for both"
            ) from None
    else:
        os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet this call starts
        ray.init(
            address="local",  # a new cluster, never one another process started here (`ray start`, cluster local)
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


NODE_TYPE_LABEL = "vidlm/node-type"
"""The node label the shipped configs and cluster specs place stages by (``cpu``: decode nodes, ``gpu``: engines)."""

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class Placement(Section):
    """Where the tasks or actors of one stage run: Ray's scheduling options of its ``map_batches`` (or actor).

    Empty (the default): anywhere with the CPUs / GPUs the stage asks for. Nodes get labels from ``ray start
    --labels`` (KubeRay: a worker group's ``labels``; here :func:`start_local_cluster`) and custom resources from
    ``ray start --resources``.
    """

    label_selector: dict[str, str] = {}
    """Ray label selector: node label -> value, e.g. ``{"vidlm/node-type": "cpu"}``; Ray's operators work in values
    (``"!gpu"``, ``"in(cpu,spot)"``). A stage whose selector no node matches waits for one (an autoscaler adds it)."""
    resources: dict[str, float] = {}
    """Custom resources each task / actor holds, e.g. ``{"decode_slot": 1}`` (the nodes declare them)."""

    @field_validator("label_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _LABEL_KEY.match(k)]
        if bad:
            raise ValueError(f"not a Ray node label key (prefix/name, as Kubernetes labels): {bad}")
        return value

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        reserved = sorted({"CPU", "GPU", "memory", "object_store_memory"} & set(value))
        if reserved:
            raise ValueError(f"{reserved} are the stage's num_cpus / num_gpus / memory settings, not custom resources")
        negative = sorted(k for k, v in value.items() if not v > 0)
        if negative:
            raise ValueError(f"custom resources must be > 0: {negative}")
        return value

    def ray_args(self) -> dict[str, Any]:
        """``map_batches`` / ``.options`` keyword arguments: ``label_selector`` and ``resources``, where set."""
        args: dict[str, Any] = {}
        if self.label_selector:
            args["label_selector"] = dict(self.label_selector)
        if self.resources:
            args["resources"] = dict(self.resources)
        return args


def retried_tasks() -> int | None:
    """Tasks of this driver's Ray job that ran more than once (their node was lost, their worker died), from Ray's
    state API: Ray Data's task retries and the calls it resubmitted to restarted actors.

    Returns:
        The number of distinct tasks with an attempt after the first (at most 10,000), or ``None`` where the
        cluster has no state API (a local cluster started without the dashboard) or it did not answer.
    """
    from ray.util.state import list_tasks

    job_id = ray.get_runtime_context().get_job_id()
    try:
        tasks = list_tasks(
            filters=[("job_id", "=", job_id), ("attempt_number", "!=", 0)],
            limit=10_000,  # the state API's most
            timeout=30,
            raise_on_missing_output=False,
        )
    except Exception as err:  # noqa: BLE001 - no dashboard / an older cluster: the count is unknown, not an error
        logger.info("no task retry count: %s", err)
        return None
    return len({t.task_id for t in tasks})


class LocalNode(Section):
    """One worker node of :func:`start_local_cluster`."""

    node_type: str = Field("cpu", pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
    """Its :data:`NODE_TYPE_LABEL` value (a Kubernetes-style label value)."""
    num_cpus: int = Field(1, gt=0)
    resources: dict[str, float] = {}
    object_store_mb: int = Field(256, ge=80)
    """Its object store (Ray's minimum is 75 MiB)."""


DEFAULT_LOCAL_NODES = (
    LocalNode(node_type="cpu"),
    LocalNode(node_type="cpu"),
    LocalNode(node_type="engine", num_cpus=2),
)
"""``vidlm cluster local``'s worker nodes: two 1-CPU decode nodes and a 2-CPU engine node, beside a head that runs
no work -- the shape of a real cluster (placement by label, a node to lose) on a laptop."""


@dataclass
class LocalCluster:
    """A multi-node Ray cluster on this machine (:func:`start_local_cluster`)."""

    cluster: Any
    """The ``ray.cluster_utils.Cluster``."""
    nodes: list[tuple[LocalNode, Any]] = field(default_factory=list)
    """The worker nodes still in the cluster, as added: ``(spec, ray node)`` (``node.node_id``)."""

    @property
    def address(self) -> str:
        """The GCS address: ``RAY_ADDRESS`` for drivers on this machine."""
        return self.cluster.address

    @property
    def dashboard_url(self) -> str:
        """``http://HOST:PORT`` of the head's dashboard (Ray Jobs, the state API)."""
        return "http://" + self.cluster.head_node.address_info["webui_url"]

    def of_type(self, node_type: str) -> list:
        """The ray nodes labelled ``vidlm/node-type=node_type``, as added."""
        return [node for spec, node in self.nodes if spec.node_type == node_type]

    def add(self, spec: LocalNode):
        """Add a worker node (a replacement for a lost one, a scale-up); returns the ray node."""
        node = self.cluster.add_node(
            num_cpus=spec.num_cpus,
            resources=dict(spec.resources),
            labels={NODE_TYPE_LABEL: spec.node_type},
            object_store_memory=spec.object_store_mb * 2**20,
        )
        self.nodes.append((spec, node))
        return node

    def remove(self, node) -> None:
        """Kill a worker node's raylet and every process under it (workers and what they started, e.g. vLLM's
        ``EngineCore``), as when a machine is lost."""
        import psutil

        raylet = node.all_processes["raylet"][0].process.pid
        try:
            processes = psutil.Process(raylet).children(recursive=True)
        except psutil.NoSuchProcess:
            processes = []
        self.nodes = [(spec, n) for spec, n in self.nodes if n is not node]
        self.cluster.remove_node(node, allow_graceful=False)
        for process in processes:  # a worker's own children outlive the raylet: the machine would take them along
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    def shutdown(self) -> None:
        """Stop every process of the cluster."""
        self.cluster.shutdown()


FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
"""Ray health checks that declare a lost node dead in about 3-6 s instead of about 30 s (Ray's defaults)."""


def start_local_cluster(
    nodes=DEFAULT_LOCAL_NODES, dashboard_port: int = 8265, fast_node_death: bool = False
) -> LocalCluster:
    """A multi-node Ray cluster on this machine: a head with no CPUs (it runs no work, as on KubeRay) and one raylet
    per worker node, labelled ``vidlm/node-type=<node_type>``.

    Args:
        nodes: the worker nodes (:class:`LocalNode`).
        dashboard_port: the head's dashboard (Ray Jobs, the state API); 0 picks a free port.
        fast_node_death: declare a lost node dead sooner (:data:`FAST_NODE_DEATH`), for tests.

    Returns:
        The started cluster (:class:`LocalCluster`).
    """
    from ray.cluster_utils import Cluster

    if dashboard_port == 0:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dashboard_port = sock.getsockname()[1]
    os.environ.setdefault("RAY_worker_niceness", "0")  # as init_ray: workers at normal priority
    local = LocalCluster(
        Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_port": dashboard_port,
                "_system_config": dict(FAST_NODE_DEATH) if fast_node_death else {},
            },
        )
    )
    for spec in nodes:
        local.add(spec)
    local.cluster.wait_for_nodes()
    return local
