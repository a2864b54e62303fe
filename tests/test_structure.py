"""The layout the code keeps: the core never imports the jobs, the command line comes from the job registry, no
module grows past 600 lines, and importing the core or asking for help starts neither torch nor Ray."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vidlm.cli import app
from vidlm.jobs import ENTRY_POINT_GROUP, Job, registered_jobs

REPO = Path(__file__).resolve().parents[1]
JOB_PACKAGES = ("pipelines", "training", "serving")
PACKAGES = ("vidlm", *JOB_PACKAGES)
runner = CliRunner()


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((REPO / "vidlm").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_never_imports_the_jobs(path):
    jobs = sorted(m for m in _imported_modules(path) if m.split(".")[0] in JOB_PACKAGES)
    assert not jobs, f"{path.relative_to(REPO)} imports {jobs}; the jobs register through {ENTRY_POINT_GROUP}"


def test_no_module_over_600_lines():
    long = {
        str(p.relative_to(REPO)): n
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, long


def test_every_registered_job_resolves_and_has_a_command():
    jobs = registered_jobs()
    expected = {"features", "recaption", "synth-captions", "textvid", "synth-qa", "train", "eval mc", "serve", "deploy"}
    assert expected <= set(jobs)
    for job in jobs.values():
        assert isinstance(job, Job)
        run = inspect.signature(job.run_function()).parameters
        wanted = {p.name for p in job.params} | ({"config"} if job.config else set())
        assert wanted <= set(run), f"{job.name}: {job.run} lacks {wanted - set(run)}"
        if job.config:
            assert job.config_class().__name__.endswith("Config")
        group, _, name = job.name.rpartition(" ")
        result = runner.invoke(app, [*group.split(), name, "--help"], terminal_width=200)
        assert result.exit_code == 0 and job.help.split(":")[0][:30] in " ".join(result.output.split()), job.name


def test_config_lists_exactly_the_jobs_with_a_config():
    result = runner.invoke(app, ["config", "nope"], terminal_width=300)
    assert result.exit_code == 2
    with_config = sorted(n for n, j in registered_jobs().items() if j.config)
    assert str(with_config) in " ".join(result.output.split())


def test_importing_the_core_and_the_help_start_neither_torch_nor_ray():
    code = (
        "import sys, vidlm, vidlm.cli, pipelines, training, serving;"
        "from vidlm.jobs import registered_jobs; registered_jobs();"
        "heavy = sorted(m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_torchvision_imports_after_vidlm_even_without_the_site_file():
    """``import vidlm`` alone lets torchvision import (its guard), with site-packages' ``.pth`` files skipped (-S):
    what a process gets that imports vidlm before anything else."""
    import sysconfig

    paths = [str(REPO), sysconfig.get_paths()["purelib"]]
    imports = "import vidlm, torchvision.transforms, transformers.image_processing_utils"
    code = f"import sys; sys.path[:0] = {paths!r}; {imports}"
    subprocess.run([sys.executable, "-S", "-c", code], check=True, cwd=REPO, timeout=300)
