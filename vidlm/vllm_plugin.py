"""vLLM plugin: teaches every vLLM process the vidlm architecture.

Declared in ``pyproject.toml`` under ``[project.entry-points."vllm.general_plugins"]``; vLLM calls
:func:`register` in the API server, the engine core and each worker, also inside Ray actors, so
``LLM("path/to/vidlm-checkpoint")`` works without any import by the user.
"""

from __future__ import annotations

__all__ = ["VLLM_ARCHITECTURES", "register", "vllm_architecture"]

VLLM_ARCHITECTURES = {
    "<video>": "VidlmForConditionalGeneration",
    "<image>": "VidlmImagePlaceholderForConditionalGeneration",
}
"""vLLM architecture of a vidlm model by its prompt placeholder (``VidlmConfig.video_token``).

vLLM asks the model *class* which string stands for a video in a chat (``get_placeholder_str``), so each
placeholder has its class: ``<video>`` (vidlm's own and llava-hf's) and ``<image>`` (PLLaVA releases reuse LLaVA's
image token for videos). :func:`vidlm.engine.vllm_engine_kwargs` picks it through vLLM's ``hf_overrides``."""


def vllm_architecture(video_token: str) -> str:
    """The vLLM architecture that serves a vidlm model whose prompt placeholder is ``video_token``.

    Raises:
        ValueError: a placeholder vLLM's chat path cannot be told (the message lists the known ones).
    """
    if video_token not in VLLM_ARCHITECTURES:
        raise ValueError(
            f"vLLM serves vidlm models whose placeholder is one of {list(VLLM_ARCHITECTURES)}, got {video_token!r}"
        )
    return VLLM_ARCHITECTURES[video_token]


def register() -> None:
    """Register ``model_type: vidlm`` with transformers, the :data:`VLLM_ARCHITECTURES` with vLLM, and
    the ``vidlm`` video loader (:class:`vidlm.models.vllm_model.VidlmVideoLoader`) for ``video_url`` inputs."""
    from vllm import ModelRegistry
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    import vidlm.models.video_llm  # noqa: F401  registers model_type "vidlm" with transformers' AutoConfig

    for name in VLLM_ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"vidlm.models.vllm_model:{name}")
    from vidlm.models.vllm_model import VIDEO_LOADER, VidlmVideoLoader

    if VIDEO_LOADER not in VIDEO_LOADER_REGISTRY.name2class:
        VIDEO_LOADER_REGISTRY.register(VIDEO_LOADER)(VidlmVideoLoader)
