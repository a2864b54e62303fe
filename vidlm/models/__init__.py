"""The vidlm model family: vision tower -> projector -> token compressor -> language model."""
