"""The vidlm family as a vLLM model: same parts, vLLM's LLM kernels, paged KV cache and batching.

Registered through the ``vllm.general_plugins`` entry point (:mod:`vidlm.vllm_plugin`), so every vLLM
process -- the engine core, its workers, and the engines inside Ray Data and Ray Serve actors -- knows
``VidlmForConditionalGeneration`` and ``model_type: vidlm``.

- Inputs: ``multi_modal_data={"video": frames}`` with frames ``uint8 (T, H, W, 3)`` (pre-decoded by the
  Ray jobs), or ``video_url`` chat parts (the endpoint). Those are decoded by :class:`VidlmVideoLoader`,
  vLLM's video loader ``vidlm`` (``media_io_kwargs={"video": {"video_backend": "vidlm", ...}}``): the
  frame sampling and decoder of the Ray jobs (:func:`vidlm.decode.decode_clip`), not OpenCV's
  first-to-last ``linspace``, so a served clip shows the model the frames the recaption job would.
  :func:`vidlm.models.processing.preprocess_frames` turns frames into pixel values, exactly as the
  transformers path does.
- The prompt's one placeholder (``VidlmConfig.video_token``: ``<video>``, ``<image>`` for PLLaVA) is replaced
  by ``num_visual_tokens(T)`` copies (vLLM's ``PromptReplacement``); :meth:`embed_multimodal` returns the visual
  tokens from :func:`vidlm.models.visual_tokens.encode_videos`, the function the transformers model calls.
- A model with a focus token (``VidlmConfig.visual_focus_token``) weighs its regions by the question: the prompt's
  tokens after the placeholder (:func:`vidlm.models.visual_tokens.question_ids`), which the processor passes with the
  video as the processor kwarg ``question_ids``. vLLM hashes processor kwargs with the video, so its processor cache
  and prefix cache keep the visual tokens of a video apart per question.
- The LLM is vLLM's own implementation of ``text_config``'s architecture (Llama, Qwen2...), so weights
  named ``language_model.*`` load unchanged.

Parity (greedy tokens identical, top-5 logprobs within 1e-3) is a test: ``tests/test_vllm_parity.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.video import VideoLoader
from vllm.sequence import IntermediateTensors

from vidlm.clips import ClipError
from vidlm.decode import DecodeLimits, decode_clip
from vidlm.models.processing import preprocess_frames
from vidlm.models.video_llm import VidlmConfig
from vidlm.models.visual_tokens import build_video_parts, encode_videos, question_ids
from vidlm.sampling import SamplingConfig, request_sampling

__all__ = [
    "FRAMES_MEDIA_TYPE",
    "VIDEO_LOADER",
    "VidlmForConditionalGeneration",
    "VidlmImagePlaceholderForConditionalGeneration",
    "VidlmVideoLoader",
    "frames_data_url",
]

VIDEO_LOADER = "vidlm"
"""Name of :class:`VidlmVideoLoader` in vLLM's ``VIDEO_LOADER_REGISTRY`` (``media_io_kwargs.video.video_backend``)."""

FRAMES_MEDIA_TYPE = "video/x-vidlm-frames"
"""Media type of a ``data:`` video part that carries decoded frames (an ``.npy`` array) instead of a video file:
what ``vidlm recaption --serve`` sends through the deployment handle, so the replica does not decode again."""

NPY_MAGIC = b"\x93NUMPY"


def frames_data_url(frames: np.ndarray) -> str:
    """A ``video_url`` of decoded frames: ``data:video/x-vidlm-frames;base64,`` + the array as ``.npy`` bytes.

    Args:
        frames: ``(T, S, S, 3) uint8``, the model's input side (:func:`vidlm.decode.decode_clip`'s output).

    Returns:
        The URL (4/3 of ``frames.nbytes`` plus a header, in characters).
    """
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(frames), allow_pickle=False)
    return f"data:{FRAMES_MEDIA_TYPE};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _load_frames(data: bytes, size: int, most: int) -> tuple[np.ndarray, dict]:
    """Frames sent by :func:`frames_data_url`, checked as hostile input: ``(T, size, size, 3) uint8``, ``1 <= T <=
    most``. Raises ``ValueError`` naming what is wrong."""
    from numpy.lib import format as npy

    buffer = io.BytesIO(data)
    try:  # the header only: its shape is checked before an array of that shape is made
        version = npy.read_magic(buffer)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = read_header(buffer)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"undecodable frames array: {err}") from None
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or tuple(shape[1:]) != (size, size, 3):
        raise ValueError(f"frames must be uint8 (T, {size}, {size}, 3) in C order, got {dtype} {shape}")
    if not 1 <= shape[0] <= most:
        raise ValueError(f"frames: {shape[0]} sent, the engine takes 1 to {most}")
    if len(data) - buffer.tell() != int(np.prod(shape)):
        raise ValueError(f"frames: {len(data) - buffer.tell()} bytes of data for a {shape} array")
    frames = np.frombuffer(data, np.uint8, offset=buffer.tell()).reshape(shape).copy()
    metadata = {
        "total_num_frames": len(frames),
        "fps": 1.0,
        "duration": float(len(frames)),
        "video_backend": f"{VIDEO_LOADER}-frames",
        "frames_indices": list(range(len(frames))),
        "do_sample_frames": False,
    }
    return frames, metadata


class VidlmVideoLoader(VideoLoader):
    """vLLM video loader that decodes ``video_url`` parts as the Ray jobs decode clips.

    vLLM calls :meth:`load_bytes` with the merged ``media_io_kwargs["video"]``: the engine's (``sampling``,
    the model's :class:`~vidlm.sampling.SamplingConfig` as a dict, and ``size``, the tower's input side in
    pixels) and the request's (``num_frames``, ``fps``; ``-1``: not asked). Frames are sampled by
    :func:`vidlm.sampling.request_sampling` and decoded by :func:`vidlm.decode.decode_clip` (PyAV, decord
    as fallback), resized and centre-cropped to ``size x size`` in the decoder.
    """

    @classmethod
    def load_bytes(
        cls,
        data: bytes,
        num_frames: int = -1,
        fps: float = -1,
        *,
        sampling: dict | None = None,
        size: int | None = None,
        limits: dict | None = None,
        **kwargs,
    ) -> tuple[np.ndarray, dict]:
        """Decode one video.

        Args:
            data: the video file's bytes, or decoded frames (:func:`frames_data_url`: used as sent, after
                their shape is checked against ``size`` and the model's most frames).
            num_frames, fps: the request's options (frames; frames per second), ``-1`` when not asked.
            sampling, size: the engine's defaults (see the class docstring).
            limits: the engine's :class:`~vidlm.decode.DecodeLimits` as a dict (``None``: the defaults).

        Returns:
            ``(frames, metadata)``: frames ``(T, size, size, 3) uint8``; metadata as vLLM's loaders give it
            (``total_num_frames``, ``fps``, ``duration`` in seconds, ``frames_indices``...).

        Raises:
            ValueError: the engine was started without ``sampling`` / ``size``, or the bytes are not a
                decodable video (the message is :class:`~vidlm.clips.ClipError`'s).
        """
        if sampling is None or size is None:
            raise ValueError(f"video loader {VIDEO_LOADER!r} needs media_io_kwargs.video.sampling and .size")
        if data[: len(NPY_MAGIC)] == NPY_MAGIC:
            return _load_frames(data, int(size), SamplingConfig.model_validate(sampling).max_frames_per_clip())
        config = request_sampling(
            SamplingConfig.model_validate(sampling),
            num_frames if num_frames and num_frames > 0 else None,
            fps if fps and fps > 0 else None,
        )
        with tempfile.NamedTemporaryFile(suffix=".video") as f:  # decord reads files, not bytes
            f.write(data)
            f.flush()
            try:
                clip = decode_clip(f.name, config, int(size), limits=DecodeLimits.model_validate(limits or {}))
            except ClipError as err:
                raise ValueError(f"{err.error_type.value}: {err}") from None
        indices = np.rint(clip.frame_times_s * clip.info.fps).astype(int).tolist()
        metadata = {
            "total_num_frames": clip.info.num_frames,
            "fps": clip.info.fps,
            "duration": clip.info.duration_s,
            "video_backend": f"{VIDEO_LOADER}-{clip.backend}",
            "frames_indices": indices,
            "do_sample_frames": False,
        }
        return clip.frames, metadata


class VidlmProcessingInfo(BaseProcessingInfo):
    """What vLLM needs to know about a vidlm checkpoint's inputs."""

    def get_hf_config(self) -> VidlmConfig:
        return self.ctx.get_hf_config(VidlmConfig)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"video": 1}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "videos_kwargs": set()}  # no HF processor: nothing to pass through

    def max_frames(self) -> int:
        return self.get_hf_config().sampling_config.max_frames_per_clip()


class VidlmDummyInputsBuilder(BaseDummyInputsBuilder[VidlmProcessingInfo]):
    """Profiling input: one video of the most frames the model's sampling gives."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_config().video_token * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_hf_config().image_size
        videos = self._get_dummy_videos(
            width=size,
            height=size,
            num_frames=self.info.max_frames(),
            num_videos=mm_counts.get("video", 0),
            overrides=(mm_options or {}).get("video"),
        )
        return {"video": videos}


def _frames(item):
    return item[0] if isinstance(item, tuple) else item  # vLLM's loader gives (frames, metadata)


class VidlmMultiModalProcessor(BaseMultiModalProcessor[VidlmProcessingInfo]):
    """Frames -> pixel values with vidlm's own preprocessing; ``<video>`` -> ``num_visual_tokens`` placeholders."""

    def apply(self, inputs, timing_ctx):
        """vLLM's processing, with the question of a focus token (the prompt's ids after the placeholder) among the
        processor kwargs, which vLLM hashes with the video."""
        config = self.info.get_hf_config()
        if config.visual_focus_token:
            prompt = torch.tensor(list(inputs.prompt), dtype=torch.long)
            question = question_ids(prompt, config.video_token_index).tolist()
            kwargs = {**inputs.hf_processor_mm_kwargs, "question_ids": question}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        config = self.info.get_hf_config()
        videos = [
            preprocess_frames(_frames(v), config.image_size, config.image_mean, config.image_std)
            for v in hf_data.get("videos", [])
        ]  # each (T, H, W, 3) uint8 -> (T, 3, S, S) float32
        out = {"pixel_values_videos": videos}
        if config.visual_focus_token:  # the prompt's one video: its question
            question = torch.tensor(list(hf_kwargs.get("question_ids") or []), dtype=torch.long)
            out["question_ids"] = [question for _ in videos]
        return BatchFeature(out)

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = {"pixel_values_videos": MultiModalFieldConfig.batched("video")}
        if "question_ids" in hf_inputs:
            fields["question_ids"] = MultiModalFieldConfig.batched("video")
        return fields

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()

        def replacement(item_idx: int) -> list[int]:
            videos = mm_items.get_items("video", VideoProcessorItems)
            return [config.video_token_index] * config.num_visual_tokens(videos.get_num_frames(item_idx))

        return [PromptReplacement(modality="video", target=[config.video_token_index], replacement=replacement)]


@MULTIMODAL_REGISTRY.register_processor(
    VidlmMultiModalProcessor, info=VidlmProcessingInfo, dummy_inputs=VidlmDummyInputsBuilder
)
class VidlmForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP, SupportsLoRA):
    """vLLM implementation of :class:`vidlm.models.video_llm.VidlmForConditionalGeneration`.

    LoRA: adapters of the LLM (peft directories from ``vidlm train``, module names under ``language_model``)
    are served by vLLM's LoRA manager, per request (``LoRARequest``, or a model name through Ray Serve LLM).
    """

    packed_modules_mapping = {  # vLLM fuses these projections of the LLM
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    chat_placeholder = "<video>"
    """What a chat's video part becomes in the prompt text (``VidlmConfig.video_token``; see
    :data:`vidlm.vllm_plugin.VLLM_ARCHITECTURES`)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("video"):
            return cls.chat_placeholder
        raise ValueError(f"vidlm models take videos only, got {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: VidlmConfig = vllm_config.model_config.hf_config
        self.config = config
        with self._mark_tower_model(vllm_config, "video"):
            build_video_parts(self, config)  # the same modules as the transformers model
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One ``(num_visual_tokens(T), Dl)`` tensor per video in ``pixel_values_videos`` (with a focus token, each
        weighed by its ``question_ids``)."""
        videos = kwargs.pop("pixel_values_videos", None)
        if videos is None:
            return []
        if isinstance(videos, torch.Tensor):
            videos = list(videos)  # (B, T, 3, S, S) -> B x (T, 3, S, S)
        questions = None
        if self.visual_focus is not None:
            ids = kwargs.pop("question_ids", None)
            ids = list(ids) if ids is not None else [torch.zeros(0, dtype=torch.long) for _ in videos]
            embed = self.language_model.embed_input_ids
            questions = [(q.long(), embed(q.long().to(videos[0].device))) for q in ids]
        return encode_videos(self, self.config, videos, questions)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def get_mm_mapping(self) -> MultiModelKeys:
        """Module prefixes of the parts: LoRA applies to ``language_model`` only."""
        return MultiModelKeys.from_string_field(
            language_model="language_model", connector="projector", tower_model="vision_tower"
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights)


class VidlmImagePlaceholderForConditionalGeneration(VidlmForConditionalGeneration):
    """A vidlm model whose prompt placeholder is ``<image>`` (converted PLLaVA releases: LLaVA's image token,
    id ``image_token_index`` of the release's ``config.json``, stands for the video)."""

    chat_placeholder = "<image>"
