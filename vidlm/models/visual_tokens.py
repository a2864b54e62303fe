"""A video's visual tokens from its frames or its tower's features: the one implementation behind the transformers
model (:mod:`vidlm.models.video_llm`) and the vLLM model (:mod:`vidlm.models.vllm_model`), which build the same parts
(:func:`build_video_parts`) and call :func:`encode_videos` / :func:`tokens_from_features`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vidlm.models.caption_words import clip_summaries
from vidlm.models.compressors import (
    QuestionFocus,
    RegionSummaries,
    VisualMotion,
    VisualPositionEmbedding,
    build_compressor,
)
from vidlm.models.modality_projection import modality_projection
from vidlm.models.projector import build_projector
from vidlm.models.vision_tower import HFVisionTower

if TYPE_CHECKING:
    from vidlm.models.video_llm import VidlmConfig

__all__ = [
    "build_video_parts",
    "encode_videos",
    "feature_column",
    "question_ids",
    "subsample_frames",
    "tokens_from_features",
]


def encode_videos(
    parts: nn.Module,
    config: VidlmConfig,
    videos: torch.Tensor | list[torch.Tensor],
    questions: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The visual tokens of each video: tower -> [modality projection] -> projector -> compressor.

    The one implementation behind the transformers model and the vLLM model (``parts`` is either; it has
    ``vision_tower``, ``projector``, ``compressor`` and ``modality_memory``).

    Args:
        videos: ``(B, T, 3, S, S)`` or a list of ``(T_i, 3, S, S)`` float pixel values.
        questions: for a model with ``visual_focus_token``, each video's question (see :func:`tokens_from_features`).

    Returns:
        one ``(num_visual_tokens(T_i), Dl)`` tensor per video, in the parts' dtype.

    Raises:
        ValueError: a video of another shape.
    """
    videos = list(videos)
    lengths = [v.shape[0] for v in videos]
    pooled, patches = parts.vision_tower(torch.cat(videos))  # (sum T, D), (sum T, h, w, Dv)
    features = pooled if config.compressor_config.kind == "global" else patches
    return tokens_from_features(parts, config, list(features.split(lengths)), questions=questions)


def feature_column(config: VidlmConfig) -> str:
    """Which output column of ``vidlm features`` a model trains on: ``embeddings`` (TOPA) or ``patch_features``."""
    return "embeddings" if config.compressor_config.kind == "global" else "patch_features"


def subsample_frames(features, max_frames: int):
    """Rows of a feature sequence evenly subsampled to ``max_frames`` when longer, as TOPA's dataloaders do
    (``video[(j * len(video)) // max_feats]`` for ``j < max_feats``); shorter sequences are returned unchanged.

    Args:
        features: ``(T, ...)`` array or tensor (one row per frame).
        max_frames: the model's frame count (``VidlmConfig.sampling_config.max_frames_per_clip()``).

    Returns:
        ``(min(T, max_frames), ...)``, the same type.
    """
    t = len(features)
    if t <= max_frames:
        return features
    return features[[(j * t) // max_frames for j in range(max_frames)]]


def _less_mean(x: torch.Tensor) -> torch.Tensor:
    """``(1, L, ...)`` less its mean over dim 1, place by place: over the ``T`` frames of ``(1, T, ...)`` features,
    or over the ``N`` tokens of ``(1, N, Dl)`` visual tokens."""
    return x - x.mean(dim=1, keepdim=True)


def _across_frames(y: torch.Tensor, centring: str | None) -> torch.Tensor:
    """``(1, T, ...)`` features at the compressor's input, centred across the frames as ``centring`` says
    (:attr:`~vidlm.models.video_llm.VidlmConfig.center_visual_tokens`): ``"frames"``, less their mean over the frames;
    ``"differences"``, the first frame less that mean and each later frame less the previous one; anything else,
    unchanged."""
    if centring == "frames":
        return _less_mean(y)
    if centring == "differences":
        return torch.cat([y[:, :1] - y.mean(dim=1, keepdim=True), torch.diff(y, dim=1)], dim=1)
    return y


def question_ids(
    ids: torch.Tensor,
    video_token_index: int,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The question a focus token weighs the regions by
    (:attr:`~vidlm.models.video_llm.VidlmConfig.visual_focus_token`): a sequence's tokens after its video's last
    placeholder, up to its first labelled token (an answer in training and scoring), padding (``attention_mask`` 0) left
    out. Without labels, the rest of the prompt: the vLLM model takes the same tokens from its prompt
    (:mod:`vidlm.models.vllm_model`), and the chat template's own tokens weigh nothing.

    Args:
        ids: ``(L,) int64``, one sequence with its placeholders expanded.
        labels: ``(L,) int64``, ``-100`` where no label is.
        attention_mask: ``(L,)``, 0 on padding.

    Returns:
        ``(Q,) int64`` (``Q = 0``: no placeholder, or nothing after it).
    """
    placeholders = torch.nonzero(ids == video_token_index).flatten()
    if placeholders.numel() == 0:
        return ids[:0]
    start = int(placeholders[-1]) + 1
    end = len(ids)
    if labels is not None:
        labelled = torch.nonzero(labels[start:] != -100).flatten()
        end = start + int(labelled[0]) if labelled.numel() else end
    kept = ids[start:end]
    if attention_mask is not None:
        kept = kept[attention_mask[start:end].bool()]
    return kept


def tokens_from_features(
    parts: nn.Module,
    config: VidlmConfig,
    features: list[torch.Tensor],
    text_features: bool = False,
    questions: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The visual tokens of each video from its frozen tower's features (what ``vidlm features`` writes).

    Training reads features from parquet, so the tower runs once, in the feature job; inference runs the tower
    and then this same function (:func:`encode_videos`).

    TOPA (the ``global`` compressor): every feature is L2-normalised first (TOPA's ``video / video.norm(...)``;
    CLIP text features are unit-norm already), then, for image features and a model with a memory, projected
    onto the memory of CLIP text features (TOPA eq. 2, :func:`~vidlm.models.modality_projection.modality_projection`).
    Tideo text features (``text_features``) are what the model was pre-aligned on: they are not projected.
    ``config.center_visual_tokens``: ``"frames"`` subtracts from the compressor's input (the projected patch
    features, or the tower's with ``pool_before_projector``; the projected pooled embeddings for ``global``) their
    mean over the clip's frames; ``"differences"`` there turns the frames into frame differences (the first frame
    less the mean); ``"clip"`` subtracts from each video's tokens their mean over the video, last. Then
    ``config.visual_position_embedding`` adds the learned ``(h, w, D)`` embedding to every frame's patch features
    at the compressor's input. ``config.visual_summary_token`` appends, after all of that, the projector of the
    maximum of the video's patch features over its frames and patches, plus their motion where the model has
    ``visual_motion`` (:func:`~vidlm.models.caption_words.clip_summaries`), then ``config.visual_region_tokens``
    the region summaries (:class:`~vidlm.models.compressors.RegionSummaries`), and then ``config.visual_focus_token``
    the focus token (:class:`~vidlm.models.compressors.QuestionFocus`) of the video's question.

    Args:
        features: one tensor per video: ``(T, D)`` pooled embeddings for the ``global`` compressor (TOPA:
            CLIP image features, or CLIP text features of a Tideo's textual frames), else ``(T, h*w, Dv)`` or
            ``(T, h, w, Dv)`` patch features of the tower's ``vision_feature_layer``.
        text_features: the features are CLIP *text* features (TOPA training on Tideos).
        questions: for a model with ``visual_focus_token``, one ``(ids (Q,) int64, embeddings (Q, Dl))`` per video:
            its question's tokens (:func:`question_ids`) and their LLM input embeddings (``None``, or ``Q = 0``: no
            question, the focus token is the regions' mean).

    Returns:
        one ``(num_visual_tokens(T), Dl)`` tensor per video, in the projector's dtype.

    Raises:
        ValueError: features whose shape does not fit the model (names the expected shape).
    """
    kind = config.compressor_config.kind
    centring = config.center_visual_tokens
    dtype = next(parts.projector.parameters()).dtype
    g, _ = config.compressor_config.grid
    out = []
    for i, x in enumerate(features):
        if kind == "global":
            width = config.projector_config.vision_dim
            if x.ndim != 2 or x.shape[-1] != width:
                raise ValueError(f"expected pooled features (T, {width}), got {tuple(x.shape)}")
            x = F.normalize(x.float(), dim=-1)  # (T, D), unit norm
            if parts.modality_memory is not None and not text_features:  # TOPA eq. 2, at inference
                x = modality_projection(x, parts.modality_memory, tau=config.modality_temperature)
            tokens = _across_frames(parts.projector(x.to(dtype)[None]), centring)  # (1, T, D) -> (1, T, Dl)
        else:
            x = x.to(dtype)
            width = config.vision_config.hidden_size
            if x.ndim == 3 and x.shape[1] == g * g:
                x = x.reshape(x.shape[0], g, g, x.shape[-1])  # (T, h*w, Dv) -> (T, h, w, Dv)
            if x.ndim != 4 or tuple(x.shape[1:]) != (g, g, width):
                raise ValueError(
                    f"expected patch features (T, {g * g}, {width}) or (T, {g}, {g}, {width}), got {tuple(x.shape)}"
                )
            # (1, T, h, w, Dv), or (1, T, h, w, Dl) projected first
            y = _across_frames(x[None] if config.pool_before_projector else parts.projector(x[None]), centring)
            if parts.visual_position_embedding is not None:
                y = parts.visual_position_embedding(y)  # + (h, w, D) on every frame
            tokens = parts.compressor(y)  # -> (1, N, D); N = 0 for ``none``
            if config.pool_before_projector:
                tokens = parts.projector(tokens)  # -> (1, N, Dl)
        if centring == "clip":
            tokens = _less_mean(tokens)  # (1, N, Dl), zero mean over the clip's N tokens
        if config.visual_summary_token:
            summary = clip_summaries(parts.projector, [x], parts.visual_motion)  # (1, Dl)
            tokens = torch.cat([tokens, summary[None].to(tokens.dtype)], dim=1)  # (1, N + 1, Dl)
        if parts.visual_regions is not None:
            regions = parts.visual_regions(x, parts.projector)  # (R*R, Dl)
            tokens = torch.cat([tokens, regions[None].to(tokens.dtype)], dim=1)  # (1, N + 1 + R*R, Dl)
            if parts.visual_focus is not None:
                ids, words = questions[i] if questions else (None, None)
                if ids is None:
                    ids, words = torch.zeros(0, dtype=torch.long), regions[:0]
                focus = parts.visual_focus(regions, ids.to(regions.device), words)  # (Dl,)
                tokens = torch.cat([tokens, focus[None, None].to(tokens.dtype)], dim=1)  # (1, N + 2 + R*R, Dl)
        out.append(tokens[0])
    return out


def build_video_parts(parts: nn.Module, config: VidlmConfig) -> None:
    """Create ``vision_tower``, ``projector``, ``compressor``, ``visual_*`` and ``modality_memory`` on ``parts``
    (``visual_focus.word_weights`` is a buffer: every model with a focus token has it)."""
    parts.vision_tower = HFVisionTower(config.vision_config, config.vision_feature_layer, config.projection_dim)
    parts.projector = build_projector(config.projector_config)
    width = config.vision_config.hidden_size if config.pool_before_projector else config.text_config.hidden_size
    parts.compressor = build_compressor(config.compressor_config, dim=width)
    grid = config.compressor_config.grid
    parts.visual_position_embedding = VisualPositionEmbedding(grid, width) if config.visual_position_embedding else None
    dims = (grid, config.vision_config.hidden_size, config.text_config.hidden_size)
    parts.visual_motion = VisualMotion(*dims) if config.visual_motion else None
    regions = config.visual_region_tokens
    order = config.visual_region_order
    parts.visual_regions = RegionSummaries(grid, regions, *dims[1:], order=order) if regions else None
    focus = config.visual_focus_token
    vocab = config.text_config.vocab_size
    parts.visual_focus = QuestionFocus(vocab, config.visual_focus_temperature) if focus else None
    if config.modality_memory_size:
        parts.register_buffer("modality_memory", torch.zeros(config.modality_memory_size, parts.vision_tower.embed_dim))
    else:
        parts.modality_memory = None
