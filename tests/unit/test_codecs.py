import math

import pytest
import torch

from fedtune.codecs import Chain, make_codec
from fedtune.codecs.quantize import Quantize
from fedtune.codecs.topk import TopK


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x.lora_A.weight": torch.randn(8, 64, generator=g), "x.lora_B.weight": torch.randn(64, 8, generator=g)}


def numel(s: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in s.values())


def test_identity_round_trip_is_exact_and_bytes_are_the_payload() -> None:
    codec = make_codec("identity")
    s = state()
    payload, _ = codec.encode(s, None, torch.Generator())
    out, _ = codec.decode(payload, None)
    assert all(torch.equal(out[k], s[k]) for k in s)
    raw = numel(s) * 4
    assert raw < len(payload) < raw + 512  # tensors plus a small safetensors header


def test_fp16_halves_the_bytes_within_its_error_bound() -> None:
    s = state()
    p32, _ = make_codec("identity").encode(s, None, torch.Generator())
    codec = make_codec("fp16")
    p16, _ = codec.encode(s, None, torch.Generator())
    out, _ = codec.decode(p16, None)
    assert len(p32) - len(p16) == pytest.approx(2 * numel(s), abs=64)
    for k in s:
        assert out[k].dtype == torch.float32
        # fp16 has an 11-bit significand: relative rounding error <= 2**-11
        assert torch.all((out[k] - s[k]).abs() <= s[k].abs() * 2**-11 + 1e-7)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantization_is_unbiased_within_its_bound_and_small(bits: int) -> None:
    s = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3}
    codec = make_codec("quantize", bits=bits, block=64)
    gen = torch.Generator().manual_seed(2)
    outs = []
    for _ in range(400):
        payload, _ = codec.encode(s, None, gen)
        out, _ = codec.decode(payload, None)
        outs.append(out["w"])
    stack = torch.stack(outs)
    blocks = torch.cat([s["w"], s["w"][-1:].expand(24)]).reshape(-1, 64)  # padded as the codec pads
    step = ((blocks.max(1).values - blocks.min(1).values) / (2**bits - 1)).repeat_interleave(64)[:1000]
    assert torch.all((stack - s["w"]).abs() <= step + 1e-6)  # every draw within one step
    # unbiased: the mean of 400 draws is within 4 standard errors (per-draw var <= step^2 / 4)
    assert torch.all((stack.mean(0) - s["w"]).abs() <= 4 * step / 2 / math.sqrt(400) + 1e-6)
    # bytes: bits per value + 2 fp32 scalars per block + header
    expected = 1024 * bits // 8 + 16 * 8
    assert expected < len(payload) < expected + 600


def test_nearest_rounding_is_deterministic_and_within_half_a_step() -> None:
    s = state()
    codec = make_codec("quantize", bits=4, stochastic=False)
    a, _ = codec.encode(s, None, torch.Generator().manual_seed(0))
    b, _ = codec.encode(s, None, torch.Generator().manual_seed(9))
    assert a == b
    out, _ = codec.decode(a, None)
    for k in s:
        rng = s[k].max() - s[k].min()  # one block covers each tensor here (512 values, block 256: 2 blocks)
        assert (out[k] - s[k]).abs().max() <= rng / 15 / 2 + 1e-6


def test_topk_with_error_feedback_loses_nothing_and_keeps_the_residual_bounded() -> None:
    codec = make_codec("topk", fraction=0.05)
    gen = torch.Generator().manual_seed(0)
    st = None
    sent_sum = {k: torch.zeros_like(v) for k, v in state().items()}
    true_sum = {k: torch.zeros_like(v) for k, v in state().items()}
    max_g = 0.0
    norms = []
    for t in range(200):
        g = state(seed=t)
        max_g = max(max_g, max(float(v.norm()) for v in g.values()))
        payload, st = codec.encode(g, st, gen)
        out, _ = codec.decode(payload, None)
        for k in g:
            assert int((out[k] != 0).sum()) <= math.ceil(0.05 * g[k].numel())
            sent_sum[k] += out[k]
            true_sum[k] += g[k]
        norms.append(max(float(r.norm()) for r in st[0].values()))
    for k in true_sum:  # sum sent + residual == sum of updates (nothing lost, only delayed)
        torch.testing.assert_close(sent_sum[k] + st[0][k], true_sum[k], atol=1e-3, rtol=1e-5)
    # the residual stays bounded (does not grow with t): E||e||^2 <= 4 (1 - d) / d^2 G^2, d = 0.05
    assert max(norms) <= 2 * math.sqrt(1 - 0.05) / 0.05 * max_g
    assert max(norms[100:]) <= 1.5 * max(norms[:100])


def test_topk_bytes_and_chain_with_quantization() -> None:
    g = torch.Generator().manual_seed(0)
    s = {"x.lora_A.weight": torch.randn(16, 512, generator=g), "x.lora_B.weight": torch.randn(512, 16, generator=g)}
    p_top, _ = make_codec("topk", fraction=0.1).encode(s, None, torch.Generator())
    k = sum(math.ceil(0.1 * v.numel()) for v in s.values())
    assert 8 * k < len(p_top) < 8 * k + 700  # int32 index + fp32 value per entry
    chain = Chain((TopK(fraction=0.1), Quantize(bits=8)))
    p, st = chain.encode(s, None, torch.Generator().manual_seed(0))
    assert len(p) < len(p_top) - 2 * k  # the values now take 1 byte instead of 4
    out, _ = chain.decode(p, st)
    for key in s:
        kept = out[key] != 0
        assert int(kept.sum()) <= math.ceil(0.1 * s[key].numel())
        assert torch.allclose(out[key][kept], s[key][kept], atol=float(s[key].abs().max()) / 100)
    with pytest.raises(ValueError, match="stages"):
        make_codec("identity").decode(p, None)


def test_codec_config_errors_name_the_stage(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"codec.stages\[1\].bits"):
        tiny_cfg("codec.name=chain", "codec.stages=[{name: topk}, {name: quantize, bits: 3}]")
    with pytest.raises(ConfigError, match="non-empty list of stages"):
        tiny_cfg("codec.name=chain")
    with pytest.raises(ConfigError, match="unknown codec"):
        tiny_cfg("downlink_codec.name=zip")


def test_bit_packing_round_trips_any_width() -> None:
    from fedtune.codecs.aquila import pack_bits, unpack_bits

    for bits in (1, 3, 5, 11, 16):
        codes = torch.randint(0, 1 << bits, (37,), generator=torch.Generator().manual_seed(bits))
        packed = pack_bits(codes, bits)
        assert packed.numel() == math.ceil(37 * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, 37), codes.to(torch.int32))


def test_aquila_adapts_bits_skips_small_innovations_and_the_server_reuses_the_stale_update() -> None:
    from fedtune.codecs.aquila import choose_bits

    codec = make_codec("aquila", tol=0.01, beta=0.05, max_skips=2)
    gen = torch.Generator().manual_seed(0)
    g = state()
    client, server = None, None
    # round 1: a fresh update is always sent; the server's view is within the chosen precision
    p1, client = codec.encode(g, client, gen)
    seen1, server = codec.decode(p1, server)
    bits1 = client[0]["report"]["codec_bits"]
    assert bits1 == choose_bits([v.reshape(-1) for v in g.values()], 0.01) and client[0]["report"]["codec_skipped"] == 0
    err = sum(float((seen1[k] - g[k]).pow(2).sum()) for k in g)
    assert err <= 0.01 * sum(float(v.pow(2).sum()) for v in g.values())
    # round 2: almost the same update -> the innovation is small -> skipped, a header-only payload
    g2 = {k: v + 1e-4 * torch.randn(v.shape, generator=gen) for k, v in g.items()}
    p2, client = codec.encode(g2, client, gen)
    assert client[0]["report"]["codec_skipped"] == 1 and len(p2) < 100 and len(p1) > 768  # 1024 values x 6 bits
    seen2, server = codec.decode(p2, server)
    assert all(torch.equal(seen2[k], seen1[k]) for k in g)  # stale reuse
    # round 3: a different update -> sent; only the innovation travels, with fewer bits when it is smooth
    g3 = {k: 2 * v for k, v in g.items()}
    p3, client = codec.encode(g3, client, gen)
    seen3, server = codec.decode(p3, server)
    assert client[0]["report"]["codec_skipped"] == 0
    assert sum(float((seen3[k] - g3[k]).pow(2).sum()) for k in g) <= 0.01 * sum(
        float((g3[k] - seen2[k]).pow(2).sum()) for k in g
    )
    # sender and receiver hold the same q (bit for bit)
    assert all(torch.equal(client[0]["q"][k], server[0]["q"][k]) for k in g)
    # max_skips forces an upload after that many skips in a row
    for _ in range(2):
        _, client = codec.encode(g3, client, gen)
        assert client[0]["report"]["codec_skipped"] == 1
    _, client = codec.encode(g3, client, gen)
    assert client[0]["report"]["codec_skipped"] == 0
