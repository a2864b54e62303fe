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

A model with region summaries (``VidlmConfig.visual_region_tokens``) also classifies each region's token: the
caption's sentences are matched one to one to the clip's regions by the Hungarian algorithm (DETR, Carion et al.
2020, "End-to-End Object Detection with Transformers", §3.1: the matching of least total loss, scipy's
``linear_sum_assignment``), each matched region into its sentence's words, every other region into
:data:`EMPTY_REGION_WORD` -- so each object a sentence describes is learnt where it is, its colour, shape and motion in
one token.

The recipe also sets a focus token's word weights (``VidlmConfig.visual_focus_token``): each token's inverse document
frequency over the captions' sentences (:func:`word_weights`), so that a question's object words, not its function
words, pick the region.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EMPTY_REGION_WORD",
    "WORD_TEMPERATURE",
    "caption_sentences",
    "caption_word_loss",
    "clip_summaries",
    "frame_token_maxima",
    "region_word_loss",
    "vision_word_loss",
    "word_weights",
]

WORD_TEMPERATURE = 0.07
"""Softmax temperature of the cosine logits: CLIP's initial one (CLIP §2.5), fixed."""
EMPTY_REGION_WORD = " nothing"
"""The class of a region that no sentence of the caption is matched to (DETR's "no object", §3.1)."""


def caption_sentences(caption: str) -> list[str]:
    """A caption's sentences, split at full stops, each with its full stop; a sentence after the first keeps the
    space before it, so each tokenises as it does inside the caption."""
    parts = [p for p in caption.split(".") if p.strip()]
    return [p.rstrip() + "." if i == 0 else " " + p.strip() + "." for i, p in enumerate(parts)]


def word_weights(sentences: Iterable[Iterable[int]], vocab_size: int) -> torch.Tensor:
    """Each token's inverse document frequency over sentences: ``log(n / df)``, ``n`` the sentences and ``df`` those
    that hold the token (Sparck Jones 1972; the ``idf`` of tf-idf); 0 for a token no sentence holds.

    Args:
        sentences: each sentence's token ids (repeats count once).
        vocab_size: V.

    Returns:
        ``(V,) float32``; all zeros without sentences.

    Raises:
        ValueError: a token id outside ``[0, V)``.
    """
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    n = 0
    for sentence in sentences:
        ids = torch.tensor(sorted(set(sentence)), dtype=torch.long)
        if ids.numel() and not (int(ids[0]) >= 0 and int(ids[-1]) < vocab_size):
            raise ValueError(f"word_weights: token ids {ids[0]}..{ids[-1]} outside the vocabulary of {vocab_size}")
        counts[ids] += 1
        n += 1
    held = counts > 0
    weights = torch.zeros(vocab_size, dtype=torch.float64)
    weights[held] = torch.log(n / counts[held]) if n else 0.0
    return weights.float()


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


def region_word_loss(
    regions: torch.Tensor, sentences: list[list[torch.Tensor]], empty: torch.Tensor, embeddings: nn.Module
) -> torch.Tensor:
    """Mean over clips of the region summaries' loss: each sentence's region found by the Hungarian matching, the
    mean over those of the mean negative log-likelihood of the sentence's words, plus half the mean over the other
    regions of that of :data:`EMPTY_REGION_WORD`'s; the softmax of each region runs over the distinct words of the
    micro-batch's sentences and the empty word (cosine logits at :data:`WORD_TEMPERATURE`, as
    :func:`caption_word_loss`). The matching minimises the sum of the matched regions' sentence losses less their
    empty losses (scipy's ``linear_sum_assignment``).

    Args:
        regions: ``(B, K, Dl)`` float, the region summaries of each clip
            (:class:`~vidlm.models.compressors.RegionSummaries`).
        sentences: ``B`` lists of ``(W_s,) int64`` tensors, ``W_s >= 1``: the token ids of each sentence of a clip's
            caption (repeats count once), at least one; of more than ``K``, the ``K`` the matching picks count.
        empty: ``(W_e,) int64``, the token ids of :data:`EMPTY_REGION_WORD`.
        embeddings: the LLM's input embeddings (``Dl`` wide).

    Returns:
        the loss, a ``()`` float32 tensor.

    Raises:
        ValueError: not one sentence list per clip, a clip without sentences, or an empty sentence.
    """
    from scipy.optimize import linear_sum_assignment

    if regions.ndim != 3 or len(sentences) != regions.shape[0]:
        raise ValueError(f"region words: {len(sentences)} sentence lists for regions of shape {tuple(regions.shape)}")
    if any(not s for s in sentences) or any(w.numel() == 0 for s in sentences for w in s):
        raise ValueError("region words: each clip needs a sentence, and each sentence a word")
    vocab, index = torch.unique(torch.cat([empty, *(w for s in sentences for w in s)]), return_inverse=True)
    groups = index[len(empty) :].split([w.numel() for s in sentences for w in s])  # each sentence's classes
    empty_classes = index[: len(empty)]
    classes = F.normalize(embeddings(vocab).float(), dim=-1)  # (V, Dl)
    log_probs = torch.log_softmax(F.normalize(regions.float(), dim=-1) @ classes.T / WORD_TEMPERATURE, dim=-1)
    losses, n = [], 0
    for b, clip in enumerate(sentences):
        cost = torch.stack([-log_probs[b][:, groups[n + j]].mean(-1) for j in range(len(clip))], dim=1)  # (K, S)
        n += len(clip)
        empty_cost = -log_probs[b][:, empty_classes].mean(-1)  # (K,)
        rows, cols = linear_sum_assignment((cost - empty_cost[:, None]).detach().cpu().numpy())
        others = torch.ones(regions.shape[1], dtype=torch.bool, device=regions.device)
        others[torch.as_tensor(rows, device=regions.device)] = False
        loss = cost[rows, cols].mean()
        losses.append(loss + 0.5 * empty_cost[others].mean() if bool(others.any()) else loss)
    return torch.stack(losses).mean()


def vision_word_loss(
    model: nn.Module,
    videos: list[torch.Tensor],
    words: list[torch.Tensor],
    sentences: list[list[torch.Tensor]] | None = None,
    empty: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``words`` recipe's loss of a :class:`~vidlm.models.video_llm.VidlmForConditionalGeneration`: its tower on
    the clips' frames, each clip's vector (:func:`clip_summaries`; ``global``: :func:`frame_token_maxima`) classified
    into its caption's words (:func:`caption_word_loss`), plus, for a model with region summaries,
    :func:`region_word_loss`.

    Args:
        model: the model (``vision_tower``, ``projector``, ``visual_motion``, ``visual_regions``, its config).
        videos: ``B`` tensors ``(T_i, 3, S, S)`` float, the clips' pixel values.
        words: ``B`` tensors ``(W_i,) int64``, each caption's token ids.
        sentences, empty: each caption's sentences' token ids and :data:`EMPTY_REGION_WORD`'s
            (:func:`region_word_loss`); needed by a model with region summaries.

    Returns:
        the loss, a ``()`` float32 tensor.

    Raises:
        ValueError: a model with region summaries without ``sentences`` and ``empty``.
    """
    pooled, patches = model.vision_tower(torch.cat(videos))  # (sum T, D), (sum T, h, w, Dv)
    lengths = [len(v) for v in videos]
    embeddings = model.get_input_embeddings()
    if model.config.compressor_config.kind == "global":
        return caption_word_loss(frame_token_maxima(model.projector, list(pooled.split(lengths))), words, embeddings)
    clips = list(patches.split(lengths))
    loss = caption_word_loss(clip_summaries(model.projector, clips, model.visual_motion), words, embeddings)
    if model.visual_regions is None:
        return loss
    if sentences is None or empty is None:
        raise ValueError("region summaries need the captions' sentences (caption_sentences) and the empty word")
    regions = torch.stack([model.visual_regions(x, model.projector) for x in clips])  # (B, R*R, Dl)
    return loss + region_word_loss(regions, sentences, empty, embeddings)
