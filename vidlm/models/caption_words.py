"""Caption-word pre-training of the vision tower and projector (``vidlm train`` recipe ``words``).

A tower trained from random weights through the LLM's loss learns what a clip's visual tokens share with the
caption's most frequent words (colour) and not the rest (shape; docs/tutorial-findings.md): the LLM's gradient reaches
it diluted by every other token of the answer. As CatLIP (Mehta et al. 2024, "CatLIP: CLIP-level Visual Recognition
Accuracy with 2.7x Faster Pre-training on Web-scale Image-Text Data") classifies an image into the words of its
caption, this recipe classifies a clip -- the projector of the maximum of its tower's patch features over its frames and
patches, plus where they went where the model has ``visual_motion`` -- into the words of its caption, with the LLM's
own (frozen) input embeddings of those words as the classes' weights and CLIP's cosine logits at its initial
temperature (CLIP, Radford et al. 2021, §2.5: "initialized to the equivalent of 0.07"); the classes of a micro-batch
are the words of its captions (in-batch negatives, as CLIP's). The projector learns to put a clip's visual tokens near
its caption's words in the LLM's embedding space, and the tower to tell the clips apart by every word, before the
``video`` recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WORD_TEMPERATURE", "caption_word_loss", "clip_summaries", "frame_token_maxima"]

WORD_TEMPERATURE = 0.07
"""Softmax temperature of the cosine logits: CLIP's initial one (CLIP §2.5), fixed."""


def caption_word_loss(clips: torch.Tensor, words: list[torch.Tensor], embeddings: nn.Module) -> torch.Tensor:
    """Mean over clips of the mean negative log-likelihood of each word of its caption, among the micro-batch's words.

    A clip's score for a word is the cosine between the clip's vector and the word's input embedding, over
    :data:`WORD_TEMPERATURE`; the softmax runs over the distinct words of all the micro-batch's captions.

    Args:
        clips: ``(B, Dl)`` float, one vector per clip (the model's: the projector of the maximum of its tower's patch
            features, :meth:`~vidlm.models.video_llm.VidlmForConditionalGeneration.forward`).
        words: ``B`` tensors ``(W_i,) int64``, ``W_i >= 1``: the token ids of each caption (repeats count once).
        embeddings: the LLM's input embeddings (``Dl`` wide), called on the words' ids.

    Returns:
        the loss, a ``()`` float32 tensor.

    Raises:
        ValueError: not one word tensor per clip, or a clip without words.
    """
    if clips.ndim != 2 or len(words) != clips.shape[0] or not words:
        raise ValueError(f"caption_words: {len(words)} word lists for clips of shape {tuple(clips.shape)}")
    if any(w.numel() == 0 for w in words):
        raise ValueError("caption_words: a clip whose caption has no words")
    vocab, index = torch.unique(torch.cat([w.flatten() for w in words]), return_inverse=True)  # (V,), (sum W,)
    counts = torch.tensor([w.numel() for w in words], device=vocab.device)
    rows = torch.repeat_interleave(torch.arange(len(words), device=vocab.device), counts)
    targets = torch.zeros(len(words), len(vocab), device=vocab.device)
    targets[rows, index] = 1.0  # (B, V)
    classes = embeddings(vocab).float()  # (V, Dl)
    logits = F.normalize(clips.float(), dim=-1) @ F.normalize(classes, dim=-1).T / WORD_TEMPERATURE  # (B, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -((log_probs * targets).sum(-1) / targets.sum(-1)).mean()


def clip_summaries(projector: nn.Module, patches: list[torch.Tensor], motion: nn.Module | None = None) -> torch.Tensor:
    """Each clip's summary vector: the projector of the maximum of its patch features over its frames and patches,
    plus, given the model's ``motion`` (:class:`~vidlm.models.compressors.VisualMotion`), where they went.

    The ``words`` recipe classifies it into the clip's caption words (:func:`caption_word_loss`) and
    ``VidlmConfig.visual_summary_token`` appends it to the clip's visual tokens: one computation for both.

    Args:
        projector: the model's projector, ``Dv -> Dl``.
        patches: one ``(T_i, h, w, Dv)`` float tensor of tower patch features per clip.
        motion: the model's ``visual_motion`` (``(T, h, w, Dv) -> (Dl,)``), or ``None``.

    Returns:
        ``(B, Dl)``, in the projector's output dtype.
    """
    summaries = projector(torch.stack([p.flatten(0, -2).max(dim=0).values for p in patches]))  # (B, Dv) -> (B, Dl)
    if motion is None:
        return summaries
    return summaries + torch.stack([motion(p) for p in patches]).to(summaries.dtype)  # (B, Dl)


def frame_token_maxima(projector: nn.Module, pooled: list[torch.Tensor]) -> torch.Tensor:
    """Each clip's vector for a ``global`` (TOPA) model: the maximum over its frames of their tokens -- the unit-norm
    pooled embeddings through TOPA's projector and its temporal embedding. The memory's projection (TOPA eq. 2) is
    left out: it passes no gradient (:func:`~vidlm.models.modality_projection.modality_projection`), and TOPA applies
    it at inference only.

    Args:
        projector: the model's ``topa_linear`` projector, ``(1, T, D) -> (1, T, Dl)``.
        pooled: one ``(T_i, D)`` float tensor of the tower's pooled embeddings per clip.

    Returns:
        ``(B, Dl)``, in the projector's output dtype.
    """
    unit = [F.normalize(x.float(), dim=-1).to(x.dtype) for x in pooled]  # as tokens_from_features normalises
    return torch.stack([projector(u[None])[0].max(dim=0).values for u in unit])  # (B, Dl)
