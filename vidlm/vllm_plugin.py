"""vLLM plugin: teaches every vLLM process the vidlm architecture.

Declared in ``pyproject.toml`` under ``[project.entry-points."vllm.general_plugins"]``; vLLM calls
:func:`register` in the API server, the engine core and each worker, also inside Ray actors, so
``LLM("path/to/vidlm-checkpoint")`` works without any import by the user.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register ``model_type: vidlm`` with transformers, ``VidlmForConditionalGeneration`` with vLLM, and
    the ``vidlm`` video loader (:class:`vidlm.models.vllm_model.VidlmVideoLoader`) for ``video_url`` inputs."""
    from vllm import ModelRegistry
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    import vidlm.models.video_llm  # noqa: F401  registers model_type "vidlm" with transformers' AutoConfig

    if "VidlmForConditionalGeneration" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "VidlmForConditionalGeneration", "vidlm.models.vllm_model:VidlmForConditionalGeneration"
        )
    from vidlm.models.vllm_model import VIDEO_LOADER, VidlmVideoLoader

    if VIDEO_LOADER not in VIDEO_LOADER_REGISTRY.name2class:
        VIDEO_LOADER_REGISTRY.register(VIDEO_LOADER)(VidlmVideoLoader)
