"""Codecs: how adapter tensors travel. One file per stage, registered by name; a codec is a chain."""

from fedtune.codecs import aquila, identity, quantize, topk  # noqa: F401  (registers)
from fedtune.codecs.base import CODECS, Chain, Codec, deserialize, make_codec, serialize

__all__ = ["CODECS", "Chain", "Codec", "deserialize", "make_codec", "serialize"]
