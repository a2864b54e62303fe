"""vLLM plugin: teaches every vLLM process the vidlm architecture.

Declared in ``pyproject.toml`` under ``[project.entry-points."vllm.general_plugins"]``; vLLM calls
:func:`register` in the API server, the engine core and each worker, also inside Ray actors, so
``LLM("path/to/vidlm-checkpoint")`` works without any import by the user.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register ``model_type: vidlm`` with transformers and ``VidlmForConditionalGeneration`` with vLLM."""
    from vllm import ModelRegistry

    import vidlm.models.video_llm  # noqa: F401  registers model_type "vidlm" with transformers' AutoConfig

    if "VidlmForConditionalGeneration" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "VidlmForConditionalGeneration", "vidlm.models.vllm_model:VidlmForConditionalGeneration"
        )
