"""What a training run shows while it runs and leaves beside ``OUT/metrics.jsonl``: a progress bar and a loss curve.

Both read ``metrics.jsonl`` (rank 0 writes a record per optimizer step: ``step``, ``loss``, ``attempt``...), so they
see what the run wrote, restarts included, and need nothing from the workers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from vidlm.writers import write_figure

__all__ = ["LOSS_CURVE", "show_progress", "write_loss_curve"]

LOSS_CURVE = "loss.png"
"""The loss curve's file in ``OUT``."""


def write_loss_curve(records: list[dict], png: Path) -> Path | None:
    """Plot the training loss per optimizer step, one series per attempt (a restart from a checkpoint redoes steps).

    Args:
        records: ``metrics.jsonl`` records, every attempt's (``step``, ``loss``, ``attempt``).
        png: the file to write.

    Returns:
        ``png``, or ``None`` when there is no record.
    """
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for attempt in sorted({r["attempt"] for r in records}):
        steps = [(r["step"], r["loss"]) for r in records if r["attempt"] == attempt]
        ax.plot([s for s, _ in steps], [loss for _, loss in steps], label=f"attempt {attempt}", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.legend()
    return write_figure(fig, png)


def show_progress(read: Callable[[], list[dict]], total_steps: int, stop: threading.Event) -> None:
    """Rich progress bar of optimizer steps with the latest loss and step time, until ``stop`` is set.

    Args:
        read: the run's ``metrics.jsonl`` records so far (``training.trainer.read_metrics``).
        total_steps: the run's optimizer steps.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeElapsedColumn(), refresh_per_second=2) as bar:
        task = bar.add_task("steps", total=total_steps, info="starting the workers")
        finished = False
        while not finished:
            finished = stop.wait(1.0)  # one last refresh after the run ends
            records = read()
            if records:
                last = records[-1]
                info = f"loss {last['loss']:.4f}, {last['step_time_s']:.2f} s/step, attempt {last['attempt']}"
                bar.update(task, completed=last["step"], info=info)
