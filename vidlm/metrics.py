"""vidlm's own metrics, recorded through Ray's metrics API (``ray.util.metrics``) from the processes doing the work.

Every Ray node exports them with Ray's, for Prometheus, on its metrics port (``ray.nodes()[i]["MetricsExportPort"]``,
``/metrics``), prefixed ``ray_``; ``cluster/grafana-vidlm.json`` charts them. A job's numbers live in the process
that records them (a decode task, an encoder or engine actor, the endpoint's ingress), so the metrics are made
lazily in each one.

==========================================  =========  ==================================================
Prometheus name                             kind       tags
==========================================  =========  ==================================================
``ray_vidlm_clips_total``                   counter    ``job``, ``outcome`` (``ok`` or the ``error_type``)
``ray_vidlm_tokens_total``                  counter    ``job``, ``kind`` (``prompt``, ``output``)
``ray_vidlm_stage_seconds``                 histogram  ``stage`` (``decode``, ``encode``, ``generate``): one batch
``ray_vidlm_engine_requests_in_flight``     gauge      ``job``: requests an engine actor awaits
``ray_vidlm_requests_total``                counter    ``status`` (HTTP code): the endpoint's chat requests
==========================================  =========  ==================================================
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

__all__ = ["METRIC_NAMES", "STAGE_BOUNDARIES_S", "clips_done", "in_flight", "request_done", "stage_seconds", "tokens"]

STAGE_BOUNDARIES_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
"""Bucket bounds of ``vidlm_stage_seconds``, seconds per batch."""

METRIC_NAMES = (
    "vidlm_clips",
    "vidlm_tokens",
    "vidlm_stage_seconds",
    "vidlm_engine_requests_in_flight",
    "vidlm_requests",
)
"""The names given to Ray (Prometheus adds ``ray_`` and, for counters, ``_total``)."""


@functools.cache
def _metric(name: str):
    from ray.util.metrics import Counter, Gauge, Histogram

    if name == "vidlm_clips":
        return Counter(name, "Clips a job finished, by outcome (ok or the error_type)", tag_keys=("job", "outcome"))
    if name == "vidlm_tokens":
        return Counter(name, "Prompt and output tokens of a job's engines", tag_keys=("job", "kind"))
    if name == "vidlm_stage_seconds":
        return Histogram(name, "Seconds one batch spent in a stage", STAGE_BOUNDARIES_S, tag_keys=("stage",))
    if name == "vidlm_engine_requests_in_flight":
        return Gauge(name, "Requests an engine actor has sent and awaits", tag_keys=("job",))
    if name == "vidlm_requests":
        return Counter(name, "The endpoint's chat requests, by HTTP status", tag_keys=("status",))
    raise KeyError(name)


def clips_done(job: str, error_types: Iterable[str | None]) -> None:
    """Count finished clips: ``None`` is ``ok``, any other value its ``error_type``."""
    counts: dict[str, int] = {}
    for error_type in error_types:
        counts[error_type or "ok"] = counts.get(error_type or "ok", 0) + 1
    for outcome, count in counts.items():
        _metric("vidlm_clips").inc(count, tags={"job": job, "outcome": outcome})


def tokens(job: str, prompt: int, output: int) -> None:
    """Count an engine's prompt and output tokens (a batch's)."""
    if prompt:
        _metric("vidlm_tokens").inc(prompt, tags={"job": job, "kind": "prompt"})
    if output:
        _metric("vidlm_tokens").inc(output, tags={"job": job, "kind": "output"})


def stage_seconds(stage: str, seconds: float) -> None:
    """Record one batch's seconds in ``stage`` (``decode``, ``encode``, ``generate``)."""
    _metric("vidlm_stage_seconds").observe(seconds, tags={"stage": stage})


def in_flight(job: str, requests: int) -> None:
    """Set the requests an engine actor of ``job`` awaits (its queue at the engine)."""
    _metric("vidlm_engine_requests_in_flight").set(requests, tags={"job": job})


def request_done(status: int) -> None:
    """Count one of the endpoint's chat requests by its HTTP status."""
    _metric("vidlm_requests").inc(1, tags={"status": str(status)})
