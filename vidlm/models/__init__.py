"""The vidlm model family: vision tower -> projector -> token compressor -> language model.

Importing this package registers ``model_type: vidlm`` with transformers' Auto classes (``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoProcessor``), so a vidlm model directory loads with plain
``from_pretrained`` and no ``trust_remote_code``::

    import vidlm.models
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained("runs/topa/export")
    processor = AutoProcessor.from_pretrained("runs/topa/export")
"""

from vidlm.models.processing import VidlmProcessor
from vidlm.models.video_llm import VidlmConfig, VidlmForConditionalGeneration

__all__ = ["VidlmConfig", "VidlmForConditionalGeneration", "VidlmProcessor"]
