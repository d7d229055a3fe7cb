"""Codecs: how adapter tensors travel. One file per codec, registered by name."""

from fedtune.codecs import identity  # noqa: F401  (registers)
from fedtune.codecs.base import CODECS, Codec, deserialize, serialize

__all__ = ["CODECS", "Codec", "deserialize", "serialize"]
