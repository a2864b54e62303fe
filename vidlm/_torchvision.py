"""Lets torchvision import beside a CPU build of torch.

PyPI's torchvision wheels are CUDA builds; beside a CPU torch their C++ ops do not load. torchvision's
``_meta_registrations`` still registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` without the
``_has_ops()`` guard its other registrations have, and ``import torchvision`` raises ``operator torchvision::nms does
not exist`` -- which breaks vLLM and transformers' image processors, which only need torchvision's Python side
(transforms).

:func:`install` adds an import hook (no import of torch or torchvision until torchvision itself is imported): just
before ``torchvision._meta_registrations`` loads, it declares the schemas of those two operators when torchvision's
C++ ops did not declare them. Calling ``torchvision.ops.nms`` then fails with "no kernel", as it would anyway;
nothing changes where the ops load (a CUDA torch, or a matching CPU torchvision).

``import vidlm`` installs the hook. Processes that import torchvision before any vidlm code -- Ray workers running
Ray's own classes (``ray.data.llm``'s engine stage, Ray Serve LLM's replicas), vLLM's engine processes -- get it
from a ``.pth`` file in site-packages that imports vidlm at interpreter start: :func:`write_pth` writes it
(``make install`` does, for a CPU torch).
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

__all__ = ["MISSING_OP_SCHEMAS", "PTH_FILE", "install", "write_pth"]

MISSING_OP_SCHEMAS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
"""The operators torchvision registers fake kernels for without checking that its C++ ops loaded."""

PTH_FILE = "vidlm_torchvision.pth"
"""The site-packages file that imports vidlm (and so installs the hook) in every interpreter of the environment.
Named to sort after setuptools' ``__editable__*.pth``, which makes an editable vidlm importable."""

PTH_LINE = 'import importlib.util; importlib.util.find_spec("vidlm") and __import__("vidlm")\n'
"""Its one line: a no-op where vidlm is gone (``site`` runs lines that start with ``import``)."""


def _declare_missing_ops() -> None:
    """Declare the schemas of :data:`MISSING_OP_SCHEMAS` that torch does not know."""
    import torch

    for name, schema in MISSING_OP_SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(name, "")
        except RuntimeError:
            torch.library.define(name, schema)


class _Hook(importlib.abc.MetaPathFinder):
    """Runs :func:`_declare_missing_ops` once, when ``torchvision._meta_registrations`` is about to load."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            _declare_missing_ops()
        return None  # the normal finders load the module


def install() -> None:
    """Add the import hook, unless torchvision is imported already or the hook is in place."""
    if "torchvision" in sys.modules or any(isinstance(f, _Hook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Hook())


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Write :data:`PTH_FILE` into ``site_packages`` (default: this interpreter's) and return its path."""
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_FILE
    path.write_text(PTH_LINE)
    return path
