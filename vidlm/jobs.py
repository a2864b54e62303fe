"""The registry of vidlm jobs: what the command line is built from.

A job is declared once, as a :class:`Job` -- its command name, its config class, the function that runs it and
the inputs it takes -- and registered under the ``vidlm.jobs`` entry-point group (``pyproject.toml``), as vLLM
plugins are. The core never imports the job packages (``pipelines``, ``training``, ``serving``): the command
line finds their jobs through :func:`registered_jobs`, and a job's module is imported only when it runs, so
``vidlm --help`` stays fast. A job package may come from another distribution.

A job's run function takes its inputs by name, its loaded config as ``config`` and, when it declares one, an
``echo`` callable for lines to print while it runs; it returns a :class:`Report` (or ``None``). It raises
:class:`ValueError` or :class:`FileNotFoundError` for bad inputs (usage errors, exit code 2); anything else is a
failure (exit code 1).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "REQUIRED", "Job", "Param", "Report", "load_object", "registered_jobs"]

ENTRY_POINT_GROUP = "vidlm.jobs"
"""The entry-point group jobs are registered under: ``name = "package.module:JOB"``."""

REQUIRED: Any = ...
"""The default of a :class:`Param` the user must give."""


@dataclass(frozen=True)
class Param:
    """One input of a job on the command line, besides its config.

    Args:
        name: the run function's keyword.
        type: ``Path``, ``str``, ``int``, ``float``, ``bool`` or ``X | None``.
        help: the help text.
        flags: option flags, e.g. ``("--out", "-o")``; empty for a positional argument.
        default: :data:`REQUIRED`, or the value when the user gives none.
        must_exist: a path that must exist (checked before the job starts: a usage error otherwise).
        envvar: an environment variable that gives the value when the user gives none.
    """

    name: str
    type: Any
    help: str
    flags: tuple[str, ...] = ()
    default: Any = REQUIRED
    must_exist: bool = False
    envvar: str | None = None


@dataclass(frozen=True)
class Job:
    """A job of the ``vidlm`` command line.

    Args:
        name: the command, e.g. ``recaption``; ``eval mc`` is the command ``mc`` of the group ``eval``.
        help: the command's help (its first line is the summary ``vidlm --help`` lists).
        run: ``"module:function"`` of the run function (imported when the job runs).
        config: ``"module:Class"`` of its :class:`~vidlm.config.JobConfig`, or ``None`` for a job without one.
        params: its inputs besides the config.
        model_option: it takes ``--model PRESET|DIR``, which sets the config's ``model``.
    """

    name: str
    help: str
    run: str
    config: str | None = None
    params: tuple[Param, ...] = ()
    model_option: bool = False

    def config_class(self) -> type | None:
        """The job's config class (imports its module), or ``None``."""
        return load_object(self.config) if self.config else None

    def run_function(self) -> Callable[..., Report | None]:
        """The job's run function (imports its module)."""
        return load_object(self.run)


@dataclass
class Report:
    """What a job prints when it ends: a table, then lines.

    Args:
        title: the table's title.
        rows: one tuple of cells per row.
        header: column names; ``None``: a two-column ``name | value`` table without a header.
        lines: lines printed after the table (rich markup allowed).
    """

    title: str
    rows: list[tuple[str, ...]] = field(default_factory=list)
    header: tuple[str, ...] | None = None
    lines: list[str] = field(default_factory=list)


def load_object(path: str) -> Any:
    """The object at ``"package.module:name"``.

    Raises:
        ImportError / AttributeError: no such module or name.
    """
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def registered_jobs() -> dict[str, Job]:
    """Every job registered under :data:`ENTRY_POINT_GROUP`, by name (sorted).

    Raises:
        TypeError: an entry point that is not a :class:`Job`.
        ValueError: two jobs with one name.
    """
    jobs: dict[str, Job] = {}
    for entry in md.entry_points(group=ENTRY_POINT_GROUP):
        job = entry.load()
        if not isinstance(job, Job):
            raise TypeError(f"entry point {entry.name} = {entry.value} is not a vidlm.jobs.Job")
        if job.name in jobs:
            raise ValueError(f"two jobs named {job.name!r}")
        jobs[job.name] = job
    return dict(sorted(jobs.items()))
