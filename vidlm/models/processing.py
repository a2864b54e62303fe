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
from transformers import BatchFeature, ProcessorMixin

__all__ = ["VidlmProcessor", "expand_video_tokens", "preprocess_frames", "video_prompt_ids"]


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


class VidlmProcessor(ProcessorMixin):
    """The Hugging Face processor of a vidlm model: text with one video placeholder plus frames -> model inputs.

    ``AutoProcessor.from_pretrained(model_dir)`` returns one (``import vidlm.models`` registers it; no
    ``trust_remote_code``). It is built from the model's ``config.json`` and tokenizer, so every vidlm model
    directory has one without extra files. Calling it::

        inputs = processor(text="<video>\\nDescribe the video.", videos=frames)   # frames (T, H, W, 3) uint8
        model.generate(**inputs)

    Args:
        tokenizer: the model's tokenizer (with ``video_token`` in its vocabulary).
        video_token, video_token_index: the placeholder and its id (``VidlmConfig.video_token*``).
        image_size, image_mean, image_std: the tower's input side ``S`` (pixels) and statistics.
        compressor: the compressor fields with the tower's ``grid`` (``VidlmConfig.compressor_config``), which
            give ``num_visual_tokens(T)``.
        visual_summary_token: the model appends one token per clip (``VidlmConfig.visual_summary_token``).
        visual_region_tokens: ``R``: and ``R * R`` region summaries after it (``VidlmConfig.visual_region_tokens``).
        visual_focus_token: and one focus token after those (``VidlmConfig.visual_focus_token``).
    """

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        tokenizer=None,
        video_token: str = "<video>",
        video_token_index: int = 0,
        image_size: int = 224,
        image_mean: Sequence[float] = (0.0, 0.0, 0.0),
        image_std: Sequence[float] = (1.0, 1.0, 1.0),
        compressor: dict | None = None,
        visual_summary_token: bool = False,
        visual_region_tokens: int = 0,
        visual_focus_token: bool = False,
        chat_template: str | None = None,
        **kwargs,
    ):
        self.video_token = video_token
        self.video_token_index = video_token_index
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.compressor = dict(compressor or {})
        self.visual_summary_token = visual_summary_token
        self.visual_region_tokens = visual_region_tokens
        self.visual_focus_token = visual_focus_token
        super().__init__(tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_config(cls, config, tokenizer) -> VidlmProcessor:
        """The processor of a :class:`~vidlm.models.video_llm.VidlmConfig` with its tokenizer."""
        return cls(
            tokenizer,
            video_token=config.video_token,
            video_token_index=config.video_token_index,
            image_size=config.image_size,
            image_mean=config.image_mean,
            image_std=config.image_std,
            compressor=config.compressor_config.model_dump(),
            visual_summary_token=config.visual_summary_token,
            visual_region_tokens=config.visual_region_tokens,
            visual_focus_token=config.visual_focus_token,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> VidlmProcessor:
        """The processor of a vidlm model directory (its ``config.json`` and tokenizer).

        Raises:
            OSError: no such directory, or no tokenizer in it (transformers' errors).
        """
        from transformers import AutoTokenizer

        from vidlm.models.video_llm import VidlmConfig

        config = VidlmConfig.from_pretrained(pretrained_model_name_or_path)
        return cls.from_config(config, AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs))

    def num_visual_tokens(self, num_frames: int) -> int:
        """LLM tokens of a clip of ``num_frames`` frames (:func:`vidlm.models.compressors.num_visual_tokens`)."""
        from vidlm.models.compressors import CompressorConfig, appended_tokens, num_visual_tokens

        appended = appended_tokens(self.visual_summary_token, self.visual_region_tokens, self.visual_focus_token)
        return num_visual_tokens(CompressorConfig(**self.compressor), num_frames, appended)

    def __call__(self, text: str | list[str], videos=None, **kwargs) -> BatchFeature:
        """Tokenise ``text`` (one prompt or a batch) and preprocess one video per prompt.

        Args:
            text: prompts, each holding one ``video_token`` when ``videos`` is given (e.g. rendered with the
                tokenizer's chat template).
            videos: ``(T, H, W, 3) uint8`` frames, or a list of them (one per prompt, all of one length ``T``).

        Returns:
            ``input_ids (B, L) int64`` (placeholders expanded to ``num_visual_tokens(T)``, left-padded),
            ``attention_mask (B, L)``, and ``pixel_values_videos (B, T, 3, S, S) float32`` with videos.

        Raises:
            ValueError: a prompt without exactly one placeholder, a placeholder without a video, videos of
                different lengths, or a count of videos other than the count of prompts.
        """
        prompts = [text] if isinstance(text, str) else list(text)
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        data: dict = {}
        if videos is not None:
            clips = [videos] if isinstance(videos, (np.ndarray, torch.Tensor)) and np.ndim(videos) == 4 else videos
            if len(clips) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(clips)} videos: give one video per prompt")
            pixels = [preprocess_frames(v, self.image_size, self.image_mean, self.image_std) for v in clips]
            if len({p.shape[0] for p in pixels}) > 1:
                raise ValueError("the videos of one call must have the same number of frames")
            ids = [
                expand_video_tokens(i, self.video_token_index, self.num_visual_tokens(len(p)))
                for i, p in zip(ids, pixels, strict=True)
            ]
            data["pixel_values_videos"] = torch.stack(pixels)
        elif any(self.video_token_index in i for i in ids):
            raise ValueError(f"a prompt holds the video placeholder {self.video_token!r} but no video was given")
        longest = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data["input_ids"] = torch.tensor([[pad] * (longest - len(i)) + i for i in ids])
        data["attention_mask"] = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids])
        return BatchFeature(data)

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """The tokenizer's ``batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """The tokenizer's ``decode``."""
        return self.tokenizer.decode(*args, **kwargs)
