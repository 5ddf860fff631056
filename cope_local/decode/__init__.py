"""CoPe decoding on llama.cpp: one memory-mapped model, an amateur and an expert context."""

from cope_local.decode.decoder import MODES, Decoder, GenConfig, Generation

__all__ = ["MODES", "Decoder", "GenConfig", "Generation"]
