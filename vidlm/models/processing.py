"""Inputs of the video LLM: frames -> pixel values, and the video placeholder -> visual tokens.

One implementation used by the transformers model, the vLLM model and the Ray jobs, so a clip gives the
same numbers on every path (the parity that the reference code of the three papers does not have:
PLLaVA resizes in its processor, LLaVA-NeXT in three different helpers).

- Frames are RGB ``uint8 (T, H, W, 3)``. They are resized so the short side is the tower's input side
  ``S`` (bilinear, antialiased), centre-cropped to ``S x S`` and normalised with the tower's mean and std
  (CLIP's OpenAI statistics, or SigLIP's 0.5) -- what ``CLIPImageProcessor`` does. Frames already
  ``S x S`` (the decode stage resizes in the decoder) are only normalised.
- A prompt holds one video placeholder (``<video>``); before the LLM it becomes ``num_visual_tokens``
  copies of the placeholder id, which the model then overwrites with the visual tokens (as llava-hf
  and vLLM's prompt replacement do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["expand_video_tokens", "preprocess_frames", "video_prompt_ids"]


def preprocess_frames(
    frames: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """RGB frames -> normalised pixel values for the vision tower.

    Args:
        frames: ``(T, H, W, 3) uint8`` (an array, a tensor, or a list of ``(H, W, 3)`` arrays).
        size: the tower's input side ``S`` in pixels.
        mean, std: per-channel statistics, 3 floats each, for pixel values in ``[0, 1]``.

    Returns:
        ``(T, 3, S, S) float32``.

    Raises:
        ValueError: no frame, or frames not ``(T, H, W, 3) uint8``.
    """
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames]) if len(frames) else np.zeros((0, 0, 0, 3), np.uint8)
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
        raise ValueError(f"expected frames (T>0, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (T, H, W, 3) -> (T, 3, H, W), [0, 1]
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[:, :, top : top + size, left : left + size].clamp_(0.0, 1.0)  # (T, 3, S, S)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def expand_video_tokens(input_ids: Sequence[int], video_token_id: int, num_tokens: int) -> list[int]:
    """Replace the one video placeholder in ``input_ids`` by ``num_tokens`` copies of it.

    Raises:
        ValueError: the prompt holds no placeholder, or more than one.
    """
    ids = list(input_ids)
    count = ids.count(video_token_id)
    if count != 1:
        raise ValueError(f"a prompt must hold exactly one video placeholder (id {video_token_id}), found {count}")
    i = ids.index(video_token_id)
    return ids[:i] + [video_token_id] * num_tokens + ids[i + 1 :]


def video_prompt_ids(
    tokenizer, text: str, video_token: str, video_token_id: int, system_prompt: str | None
) -> list[int]:
    """Token ids of one chat turn about a video, with one (unexpanded) placeholder and the generation prompt.

    The user turn is ``text`` when it holds ``video_token``, else ``video_token + "\\n" + text`` (the
    video before the question, as LLaVA / PLLaVA prompt). The tokenizer's chat template renders it,
    after a system turn when ``system_prompt`` is given. The recaption job, the transformers baseline and
    the endpoint all build prompts here, so the same clip sees the same tokens on every path.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template and ``video_token`` in its vocabulary.
        text: the instruction, e.g. PLLaVA's recaption prompt.
        video_token, video_token_id: the placeholder string and its id (``VidlmConfig.video_token*``).
        system_prompt: the system message, or ``None`` for the template's own.

    Returns:
        ids (``int``), exactly one of them ``video_token_id``; text tokens = ``len(ids) - 1``.

    Raises:
        ValueError: the rendered prompt does not hold exactly one placeholder (e.g. the text holds two).
    """
    user = text if video_token in text else f"{video_token}\n{text}"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if ids.count(video_token_id) != 1:
        raise ValueError(
            f"prompt must hold exactly one {video_token!r} (id {video_token_id}), found {ids.count(video_token_id)}"
        )
    return ids
