import pytest
import torch

from fedtune.codecs import CODECS


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x.lora_A.weight": torch.randn(8, 64, generator=g), "x.lora_B.weight": torch.randn(64, 8, generator=g)}


def test_identity_round_trip_is_exact_and_bytes_are_the_payload() -> None:
    codec = CODECS.get("identity")()
    s = state()
    payload, _ = codec.encode(s, None, torch.Generator())
    out, _ = codec.decode(payload, None)
    assert all(torch.equal(out[k], s[k]) for k in s)
    raw = sum(t.numel() * 4 for t in s.values())
    assert raw < len(payload) < raw + 512  # tensors plus a small safetensors header


def test_fp16_halves_the_bytes_within_its_error_bound() -> None:
    s = state()
    p32, _ = CODECS.get("identity")().encode(s, None, torch.Generator())
    codec = CODECS.get("fp16")()
    p16, _ = codec.encode(s, None, torch.Generator())
    out, _ = codec.decode(p16, None)
    raw = sum(t.numel() for t in s.values())
    assert len(p32) - len(p16) == pytest.approx(2 * raw, abs=64)
    for k in s:
        assert out[k].dtype == torch.float32
        # fp16 has an 11-bit significand: relative rounding error <= 2**-11
        assert torch.all((out[k] - s[k]).abs() <= s[k].abs() * 2**-11 + 1e-7)
