"""The video LLM: vision tower -> projector -> token compressor -> any transformers causal LM.

One definition of the family of the three papers (PLLaVA, LLaVA-Video, TOPA); which paper a model follows
is configuration (:class:`VidlmConfig`):

- PLLaVA: penultimate-layer patch features of CLIP ViT-L/14-336, LLaVA's ``mlp2x_gelu`` projector, then
  adaptive structure pooling (PLLaVA §3.3, eq. 2); LoRA on the LLM (§3.4).
- LLaVA-Video: SigLIP-so400m patch features, ``mlp2x_gelu``, then SlowFast pooling (LLaVA-Video §3.2).
- TOPA: one pooled CLIP embedding per frame, optionally modality-projected onto a memory of CLIP text
  features (TOPA eq. 2), then a linear projection plus temporal embedding (TOPA §3.2).

The prompt holds one video placeholder token; :func:`vidlm.models.processing.expand_video_tokens` repeats
it ``num_visual_tokens`` times and :meth:`VidlmForConditionalGeneration.forward` writes the visual tokens
over those positions (llava-hf's scheme, which vLLM's prompt replacement reproduces). The vLLM class in
:mod:`vidlm.models.vllm_model` reuses the tower, projector and compressor modules of this file's config,
so the two paths differ only in the LLM's kernels.

Checkpoints are ordinary ``save_pretrained`` directories: ``config.json`` (``model_type: vidlm``),
safetensors, and the tokenizer with the placeholder added.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto import CONFIG_MAPPING

from vidlm.models.caption_words import vision_word_loss
from vidlm.models.compressors import CompressorConfig, appended_tokens, check_region_order, num_visual_tokens
from vidlm.models.processing import VidlmProcessor, preprocess_frames
from vidlm.models.projector import ProjectorConfig
from vidlm.models.visual_tokens import build_video_parts, encode_videos, question_ids, tokens_from_features
from vidlm.sampling import SamplingConfig

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VidlmConfig",
    "VidlmForConditionalGeneration",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CENTERINGS = ("clip", "frames", "differences")
"""The values of :attr:`VidlmConfig.center_visual_tokens` besides ``None``."""


def _sub_config(value, default_type: str) -> PreTrainedConfig | None:
    if isinstance(value, dict):
        value = dict(value)
        return CONFIG_MAPPING[value.pop("model_type", default_type)](**value)
    return value


class VidlmConfig(PreTrainedConfig):
    """Configuration of a vidlm video LLM (``model_type: vidlm``).

    Args:
        vision_config: ``CLIPVisionConfig`` / ``SiglipVisionConfig`` (or its dict).
        text_config: the causal LM's config (Llama, Qwen2, Yi, SmolLM2...), or its dict.
        vision_feature_layer: hidden-state index of the patch features (LLaVA / PLLaVA: -2).
        projection_dim: CLIP's ``visual_projection`` width for pooled embeddings (TOPA: 768); 0: none.
        projector: ``mlp2x_gelu`` (LLaVA) or ``topa_linear`` (TOPA).
        pool_before_projector: compress the patch features before the projector (llava-hf LLaVA-NeXT-Video's
            order) instead of after it (PLLaVA §3.3 and LLaVA-Video's ``get_2dPool``).
        compressor: :class:`~vidlm.models.compressors.CompressorConfig` fields except ``grid``, which comes
            from the tower (``image_size // patch_size``); ``kind: none``: no patch tokens, the clip's tokens are
            the ones appended after them (``visual_summary_token``, ``visual_region_tokens``, ``visual_focus_token``).
        sampling: :class:`~vidlm.sampling.SamplingConfig` fields: how many frames of a clip the model sees.
        video_token: the placeholder string in prompts.
        video_token_index: its token id (a token of the tokenizer, so the LLM has an embedding row for it).
        image_mean, image_std: the tower's pixel statistics.
        modality_memory_size: TOPA: rows ``K`` of the memory of CLIP text features (a buffer
            ``modality_memory (K, D)`` saved with the weights); 0: no modality projection.
        modality_temperature: TOPA eq. 2's tau (the reference hard-codes 0.01).
        center_visual_tokens: ``None`` (the released checkpoints' configurations), ``"clip"``: subtract from a
            clip's visual tokens their mean over the clip, so that they carry what differs between its tokens and
            frames (objects, motion) and not what they share (background, the tower's constant part); or
            ``"frames"``: subtract from each frame's patch features, at the compressor's input, their mean over the
            clip's frames at the same patch, so that only what changes between frames is left (what moves,
            appears or leaves) and a static background is gone. For towers trained from random weights (the
            tutorial's model): their shared part outweighs everything else, and the LLM, averaging over the
            tokens, reads the same input for every clip. A clip's overall tone is lost with either; with
            ``"frames"``, anything that stays still too, and the ``mean`` compressor's spatial tokens (means over
            the frames) carry nothing. ``"differences"``: at the same place, the first frame's features less
            their mean over the clip's frames and each later frame's less the previous frame's (frame
            differences): a moving object leaves its new place with the opposite sign of its old one in every frame
            after the first, so the sense of the motion is in each frame, not only in the frames' order.
        visual_position_embedding: a learned embedding per patch of the tower's grid, ``(h, w, D)`` (``D`` the
            compressor's input width), added to every frame's patch features at the compressor's input, after
            the centring. Centring removes the tower's own position embeddings (the same in every frame) from the
            tokens; this puts where a patch is back into them, so the LLM's attention, whose values carry no
            position under RoPE, reads where an object is and where it went. Not for the ``global`` compressor.
        visual_summary_token: append one token to each clip's visual tokens, after the centring: the projector
            of the maximum of the tower's patch features over the clip's frames and patches, ``(Dv,) -> (Dl,)`` --
            the vector the ``words`` recipe classifies into the caption's words
            (:mod:`vidlm.models.caption_words`). An LLM reads from it what the patch tokens hold in a few patches
            of many (a planted object's shape: docs/tutorial-findings.md). Not for the ``global`` compressor.
        visual_motion: the clip's summary vector (summary token, ``words`` recipe) adds where its patch features went
            from its first frame to its last (:class:`~vidlm.models.compressors.VisualMotion`): the sense of a motion,
            which a maximum over the frames cannot hold. Not for the ``global`` compressor.
        visual_region_tokens: ``R``: append, after the summary token, one token per region of an ``R x R`` split
            of the patch grid, each the summary of that region with its motion
            (:class:`~vidlm.models.compressors.RegionSummaries`): where a clip holds several objects, each one's
            colour, shape and motion in one token (``0``: none). Not for the ``global`` compressor.
        visual_region_order: the region summaries' order, one of :data:`~vidlm.models.compressors.REGION_ORDERS`:
            ``"grid"`` row-major, ``"appearance"`` the regions that hold an object first, in the order the objects
            appear (:func:`~vidlm.models.compressors.appearance_order`), so that a caption telling the objects in
            that order reads its k-th object from the k-th region token. Without regions, nothing to order.
        visual_focus_token: append, after the region summaries, one token: the regions weighed by their match to the
            question's words (:class:`~vidlm.models.compressors.QuestionFocus`), so that the LLM reads the object a
            question names from one token. The question is the prompt's tokens after the video's placeholders (up to the
            first labelled token in training: :func:`~vidlm.models.visual_tokens.question_ids`). Needs
            ``visual_region_tokens``.
        visual_focus_temperature: the temperature of the focus token's softmax over the regions.
        system_prompt: the system message of the chat template (``None``: the template's own).
        origin: where the configuration comes from when it is not a preset's (``vidlm convert`` names the release
            layout and the ``config.json`` fields it followed); shown by ``vidlm model``.
    """

    model_type = "vidlm"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        vision_feature_layer: int = -2,
        projection_dim: int = 0,
        projector: str = "mlp2x_gelu",
        pool_before_projector: bool = False,
        compressor: dict | None = None,
        sampling: dict | None = None,
        video_token: str = "<video>",
        video_token_index: int = 0,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        modality_memory_size: int = 0,
        modality_temperature: float = 0.01,
        center_visual_tokens: str | None = None,
        visual_position_embedding: bool = False,
        visual_summary_token: bool = False,
        visual_motion: bool = False,
        visual_region_tokens: int = 0,
        visual_region_order: str = "grid",
        visual_focus_token: bool = False,
        visual_focus_temperature: float = 0.02,
        system_prompt: str | None = None,
        origin: str | None = None,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config, "clip_vision_model")
        self.text_config = _sub_config(text_config, "llama")
        self.vision_feature_layer = vision_feature_layer
        self.projection_dim = projection_dim
        self.projector = projector
        self.pool_before_projector = pool_before_projector
        self.compressor = dict(compressor or {})
        self.sampling = dict(sampling or {})
        self.video_token = video_token
        self.video_token_index = video_token_index
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.modality_memory_size = modality_memory_size
        self.modality_temperature = modality_temperature
        self.center_visual_tokens = center_visual_tokens
        self.visual_position_embedding = visual_position_embedding
        self.visual_summary_token = visual_summary_token
        self.visual_motion = visual_motion
        self.visual_region_tokens = visual_region_tokens
        self.visual_region_order = visual_region_order
        self.visual_focus_token = visual_focus_token
        self.visual_focus_temperature = visual_focus_temperature
        self.system_prompt = system_prompt
        self.origin = origin
        if self.text_config is not None and getattr(self.text_config, "tie_word_embeddings", False):
            kwargs.setdefault("tie_word_embeddings", True)  # the LLM's own choice, as LlavaConfig does
        super().__init__(**kwargs)
        if self.vision_config is not None:
            self.validate_parts()

    def validate_parts(self) -> None:
        """Check that the parts fit together.

        Raises:
            ValueError: naming the field: a ``global`` compressor without the ``topa_linear`` projector (or the
                other way round), a modality memory without pooled embeddings, a ``center_visual_tokens`` other than
                ``None`` and :data:`CENTERINGS`, or a ``visual_position_embedding``, ``visual_summary_token`` or
                ``visual_motion`` that is not a bool or is asked of the ``global`` compressor, or a
                ``visual_region_tokens`` that is not an int from 0 to the patch grid's side (0 for ``global``), a
                ``visual_region_order`` not in :data:`~vidlm.models.compressors.REGION_ORDERS`, a
                ``visual_focus_token`` that is not a bool or has no regions to weigh, a ``visual_focus_temperature``
                that is not a positive number, or a ``none`` compressor with no token appended (a clip of no tokens)
                or with a ``visual_position_embedding`` (no patch tokens to embed).
        """
        if self.center_visual_tokens not in (None, *CENTERINGS):
            known = ", ".join(repr(c) for c in CENTERINGS)
            raise ValueError(f"center_visual_tokens must be null, {known}, got {self.center_visual_tokens!r}")
        patch_options = ("visual_position_embedding", "visual_summary_token", "visual_motion", "visual_focus_token")
        for name in patch_options:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        kind = self.compressor_config.kind
        for name in patch_options:
            if getattr(self, name) and kind == "global":
                raise ValueError(f"{name} needs a patch grid: not for compressor.kind='global'")
        regions, side = self.visual_region_tokens, 0 if kind == "global" else min(self.compressor_config.grid)
        if isinstance(regions, bool) or not isinstance(regions, int) or not 0 <= regions <= side:
            raise ValueError(f"visual_region_tokens must be an int from 0 to {side} (the grid's side), got {regions!r}")
        check_region_order(self.visual_region_order)
        appended = appended_tokens(self.visual_summary_token, regions, self.visual_focus_token)
        if kind == "none" and not appended:
            raise ValueError("compressor.kind='none' leaves a clip no tokens: it needs visual_summary_token or regions")
        if kind == "none" and self.visual_position_embedding:
            raise ValueError("visual_position_embedding embeds patch tokens: compressor.kind='none' has none")
        if self.visual_focus_token and not regions:
            raise ValueError("visual_focus_token weighs the region summaries: it needs visual_region_tokens >= 1")
        tau = self.visual_focus_temperature
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < float("inf"):
            raise ValueError(f"visual_focus_temperature must be a positive number, got {tau!r}")
        if (kind == "global") != (self.projector == "topa_linear"):
            raise ValueError(
                f"compressor.kind={kind!r} needs projector='topa_linear' and vice versa (got {self.projector!r})"
            )
        if self.modality_memory_size and kind != "global":
            raise ValueError("modality_memory_size > 0 needs compressor.kind='global' (TOPA)")

    @property
    def image_size(self) -> int:
        """S, the tower's input side in pixels."""
        return int(self.vision_config.image_size)

    @property
    def compressor_config(self) -> CompressorConfig:
        """The compressor, with the tower's patch grid."""
        g = self.vision_config.image_size // self.vision_config.patch_size
        return CompressorConfig(**{**self.compressor, "grid": (g, g)})

    @property
    def sampling_config(self) -> SamplingConfig:
        """How frames are sampled from a clip window for this model."""
        return SamplingConfig(**self.sampling)

    @property
    def projector_config(self) -> ProjectorConfig:
        """The projector, with widths from the tower and the LLM."""
        if self.projector == "topa_linear":
            vision_dim = self.projection_dim or self.vision_config.hidden_size
        else:
            vision_dim = self.vision_config.hidden_size
        return ProjectorConfig(
            kind=self.projector,
            vision_dim=vision_dim,
            llm_dim=self.text_config.hidden_size,
            max_frames=self.sampling_config.max_frames_per_clip(),
        )

    def num_visual_tokens(self, num_frames: int) -> int:
        """LLM tokens of a clip of ``num_frames`` frames (:func:`vidlm.models.compressors.num_visual_tokens`)."""
        appended = appended_tokens(self.visual_summary_token, self.visual_region_tokens, self.visual_focus_token)
        return num_visual_tokens(self.compressor_config, num_frames, appended)

    def context_overflow(
        self, num_frames: int, text_tokens: int, max_model_len: int, text: str = "text tokens"
    ) -> tuple[int, str | None]:
        """Visual tokens of a clip, and why it does not fit an engine's context, if it does not.

        The one rule of the recaption job (``context_overflow`` rows) and the endpoint (a 400): a clip fits when
        ``num_visual_tokens(num_frames) + text_tokens <= max_model_len``.

        Args:
            num_frames: frames of the clip.
            text_tokens: the prompt's tokens without the video placeholder.
            max_model_len: the engine's context (tokens).
            text: how the message names the text tokens (e.g. ``prompt tokens (template 'caption')``).

        Returns:
            ``(visual_tokens, message)``; ``message`` is ``None`` when the clip fits, else
            ``"160 visual tokens (16 frames) + 31 text tokens = 191 > max_model_len 150"``.
        """
        visual = self.num_visual_tokens(num_frames)
        if visual + text_tokens <= max_model_len:
            return visual, None
        return visual, (
            f"{visual} visual tokens ({num_frames} frames) + {text_tokens} {text} = "
            f"{visual + text_tokens} > max_model_len {max_model_len}"
        )


class VidlmForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Vision tower -> projector -> compressor -> causal LM, with ``generate()`` from transformers.

    Parameters are named ``vision_tower.*``, ``projector.*``, ``language_model.*`` (the LLM's own names,
    e.g. ``language_model.model.layers.0.self_attn.q_proj.weight``), ``visual_position_embedding.*``,
    ``visual_motion.*`` and ``visual_regions.*`` when the config asks for them and, for TOPA, ``modality_memory``.
    """

    config_class = VidlmConfig
    base_model_prefix = "vidlm"
    main_input_name = "input_ids"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = []

    def __init__(self, config: VidlmConfig):
        super().__init__(config)
        build_video_parts(self, config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Each part initialises itself (torch defaults, the LLM's own _init_weights on from_config).
        return

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def preprocess(self, frames) -> torch.Tensor:
        """RGB ``uint8 (T, H, W, 3)`` frames -> ``(T, 3, S, S) float32`` pixel values for this model."""
        c = self.config
        return preprocess_frames(frames, c.image_size, c.image_mean, c.image_std)

    def get_video_features(self, pixel_values_videos: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """Visual tokens of each video.

        Args:
            pixel_values_videos: ``(B, T, 3, S, S)`` or a list of ``(T_i, 3, S, S)``, float.

        Returns:
            one ``(num_visual_tokens(T_i), Dl)`` tensor per video, in the LLM's dtype.

        Raises:
            ValueError: a video of another shape.
        """
        return encode_videos(self, self.config, pixel_values_videos)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values_videos=None,
        video_features=None,
        text_features: bool = False,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings ``(B, L, Dl)`` with the visual tokens written over the placeholder positions.

        Args:
            input_ids: ``(B, L) int64``.
            pixel_values_videos: frames (see :meth:`get_video_features`), or
            video_features: the tower's features instead (see :func:`~vidlm.models.visual_tokens.tokens_from_features`),
                one per sequence.
            text_features: ``video_features`` are CLIP text features (TOPA's Tideos): no modality projection.
            labels, attention_mask: ``(B, L)``, where the question of a focus token ends
                (:func:`~vidlm.models.visual_tokens.question_ids`).

        Raises:
            ValueError: the placeholders of a sequence do not match its video's token count.
        """
        embeds = self.get_input_embeddings()(input_ids)  # (B, L, Dl)
        questions = None
        if self.visual_focus is not None:
            questions = []
            for b in range(input_ids.shape[0]):
                ids = question_ids(
                    input_ids[b],
                    self.config.video_token_index,
                    None if labels is None else labels[b],
                    None if attention_mask is None else attention_mask[b],
                )
                questions.append((ids, self.get_input_embeddings()(ids)))
        if video_features is not None:
            features = tokens_from_features(self, self.config, list(video_features), text_features, questions)
        elif pixel_values_videos is not None:
            features = encode_videos(self, self.config, pixel_values_videos, questions)
        else:
            return embeds
        mask = input_ids == self.config.video_token_index  # (B, L)
        for b, f in enumerate(features):
            if int(mask[b].sum()) != f.shape[0]:
                raise ValueError(
                    f"sequence {b} holds {int(mask[b].sum())} video placeholders, its video gives {f.shape[0]} tokens"
                )
        visual = torch.cat(features).to(embeds.dtype)  # (sum N, Dl)
        return embeds.masked_scatter(mask[..., None].expand_as(embeds), visual)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | list[torch.Tensor] | None = None,
        video_features: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        text_features: bool = False,
        caption_words: list[torch.Tensor] | None = None,
        caption_sentences: list[list[torch.Tensor]] | None = None,
        empty_words: torch.Tensor | None = None,
        **kwargs,
    ):
        """Run the LLM on text with videos; or, given ``caption_words``, only the vision side, for its pre-training.

        Args:
            input_ids: ``(B, L) int64``, each sequence with its placeholder expanded to its video's tokens.
            pixel_values_videos: ``(B, T, 3, S, S) float`` or a list of ``(T_i, 3, S, S)``; only at prefill.
            video_features: instead of frames, one tensor of tower features per sequence (training on the parquet of
                ``vidlm features`` / ``vidlm textvid``; see :func:`~vidlm.models.visual_tokens.tokens_from_features`).
            text_features: ``video_features`` are Tideos' CLIP text features (the TOPA recipe).
            caption_words: one ``(W_i,) int64`` tensor of caption token ids per video: the LLM does not run; the loss
                is :func:`~vidlm.models.caption_words.vision_word_loss` of the videos' frames (the ``words``
                recipe; frames only, else ``ValueError``).
            caption_sentences, empty_words: with ``caption_words``, for a model with region summaries: each
                caption's sentences' token ids and the empty region's word's.
            attention_mask, position_ids, past_key_values, labels, logits_to_keep: as the causal LM's.

        Returns:
            the causal LM's output (``logits (B, L, V) float``, ``loss`` when ``labels`` are given); with
            ``caption_words``, a ``CausalLMOutputWithPast`` holding ``loss`` alone.
        """
        if caption_words is not None:
            if pixel_values_videos is None:
                raise ValueError("caption_words: the videos' frames (pixel_values_videos) are needed")
            loss = vision_word_loss(self, list(pixel_values_videos), caption_words, caption_sentences, empty_words)
            return CausalLMOutputWithPast(loss=loss)
        if inputs_embeds is None:
            inputs_embeds = self.embed(
                input_ids, pixel_values_videos, video_features, text_features, labels, attention_mask
            )
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


AutoConfig.register("vidlm", VidlmConfig, exist_ok=True)
AutoModelForImageTextToText.register(VidlmConfig, VidlmForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VidlmConfig, VidlmProcessor, exist_ok=True)
