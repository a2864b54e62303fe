"""TOPA modality projection (TOPA §3.3, eq. 2): CLIP image features onto a memory of CLIP text features.

A model pre-aligned on text only (TOPA's Tideos: CLIP *text* features of textual frames) sees CLIP
*image* features at inference. TOPA closes the modality gap by replacing each image feature ``v`` with
a softmax-weighted mix of the text features in a memory ``M``::

    v' = norm( softmax( norm(v) . M^T / tau ) . M )            (TOPA eq. 2)

``norm`` is L2 normalisation; ``M`` holds L2-normalised text features, one per row. The reference
hard-codes ``tau = 0.01``; here it is a parameter. The softmax runs over the memory in chunks with a
running log-sum-exp, so a memory of 1M x 768 needs ``O(B x chunk)`` working memory, never ``B x N``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attach_modality_memory", "modality_projection"]


@torch.no_grad()
def modality_projection(
    features: torch.Tensor, memory: torch.Tensor, tau: float = 0.01, chunk_size: int = 65536
) -> torch.Tensor:
    """Project features onto the span of a text-feature memory (TOPA eq. 2).

    Args:
        features: ``(..., D)`` CLIP image features, any float dtype.
        memory: ``(N, D)`` CLIP text features (normalised here as well).
        tau: softmax temperature (> 0); smaller tends to the nearest memory row.
        chunk_size: memory rows per step; bounds working memory to ``(B, chunk_size)`` floats.

    Returns:
        ``(..., D)`` unit-norm features in the dtype of ``features``; each is a convex combination of
        memory rows, renormalised.

    Raises:
        ValueError: mismatched feature widths, an empty memory, or ``tau <= 0``.
    """
    if features.shape[-1] != memory.shape[-1] or memory.ndim != 2:
        raise ValueError(
            f"expected features (..., D) and memory (N, D), got {tuple(features.shape)} and {tuple(memory.shape)}"
        )
    if memory.shape[0] == 0:
        raise ValueError("the memory is empty")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    lead, d = features.shape[:-1], features.shape[-1]
    v = F.normalize(features.reshape(-1, d).float(), dim=-1)  # (B, D)
    running_max = torch.full((v.shape[0], 1), float("-inf"), device=v.device)
    denom = torch.zeros((v.shape[0], 1), device=v.device)
    acc = torch.zeros_like(v)
    for start in range(0, memory.shape[0], chunk_size):
        m = F.normalize(memory[start : start + chunk_size].to(v.device).float(), dim=-1)  # (C, D)
        logits = v @ m.T / tau  # (B, C)
        new_max = torch.maximum(running_max, logits.max(dim=-1, keepdim=True).values)
        scale = torch.exp(running_max - new_max)  # rescale what was summed under the old max
        weights = torch.exp(logits - new_max)  # (B, C)
        acc = acc * scale + weights @ m  # (B, D)
        denom = denom * scale + weights.sum(dim=-1, keepdim=True)
        running_max = new_max
    out = F.normalize(acc / denom, dim=-1)  # TOPA eq. 2: norm(softmax(.) M)
    return out.reshape(*lead, d).to(features.dtype)


def attach_modality_memory(model: nn.Module, memory) -> None:
    """Give a TOPA model its memory of CLIP text features (TOPA eq. 2), saved with its weights from then on.

    Sets ``config.modality_memory_size`` and the ``modality_memory (K, D)`` buffer (rows L2-normalised, in the
    model's dtype), replacing any memory the model had. ``vidlm train recipe: topa data.memory=...`` calls it, so
    the checkpoint and the export carry the memory into every inference path.

    Args:
        model: a :class:`~vidlm.models.video_llm.VidlmForConditionalGeneration` with the ``global`` compressor.
        memory: ``(K, D)`` float array or tensor (``vidlm textvid``'s ``memory.npy``), ``D`` the pooled
            embedding width.

    Raises:
        ValueError: not a TOPA model, or a memory that is not ``(K>0, D)`` finite floats.
    """
    config = model.config
    if config.compressor_config.kind != "global":
        raise ValueError("a modality memory needs a TOPA model (compressor.kind='global')")
    memory = torch.as_tensor(memory)
    width = config.projector_config.vision_dim
    if memory.ndim != 2 or memory.shape[0] < 1 or memory.shape[1] != width or not memory.is_floating_point():
        raise ValueError(f"a modality memory is (K>0, {width}) floats, got {tuple(memory.shape)} {memory.dtype}")
    if not torch.isfinite(memory).all():
        raise ValueError("the modality memory holds non-finite values")
    memory = F.normalize(memory.float(), dim=-1).to(next(model.parameters()).dtype)
    config.modality_memory_size = int(memory.shape[0])
    if "modality_memory" not in model._buffers:
        delattr(model, "modality_memory")  # the plain ``None`` of a model without a memory
    model.register_buffer("modality_memory", memory)
