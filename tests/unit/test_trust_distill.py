"""trust_distill (arXiv:2305.18497): the trust rule on a hand-computed case, the pseudo-label mix,
the payloads, and the config checks (tokenizers by name, Flower, the public corpus)."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.errors import ConfigError
from fedtune.strategies.trust_distill import (
    consensus_gap,
    decode_predictions,
    distill_loss,
    encode_predictions,
    mix,
    trust_matrix,
)

# one position, k = 2: party a says {0: .5, 1: .5}, party b says {0: .8, 2: .2}
A = (torch.tensor([[0.5, 0.5]]), torch.tensor([[0, 1]]))
B = (torch.tensor([[0.8, 0.2]]), torch.tensor([[0, 2]]))


def test_trust_weights_hand_computed():
    # cos(a, b) = .5 * .8 / (sqrt(.5) sqrt(.68)); with one position the own-entropy factor
    # 1 / (1 + H) scales a whole row, so row i is (1, cos) / (1 + cos) around the diagonal
    cos = 0.4 / (math.sqrt(0.5) * math.sqrt(0.68))  # 0.685994
    w = trust_matrix([A, B])
    expected = torch.tensor([[1 / (1 + cos), cos / (1 + cos)], [cos / (1 + cos), 1 / (1 + cos)]], dtype=torch.float64)
    assert torch.allclose(w, expected, atol=1e-6)
    assert w[0, 0].item() == pytest.approx(0.593122, abs=1e-6)


def test_entropy_spreads_trust_over_positions():
    # two positions: a is certain at the first (H = 0) and unsure at the second; the position where
    # a is sure counts more in a's trust, so a trusts c (agreeing there) more than b (agreeing at the other)
    a = (torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0, 1], [2, 3]]))
    b = (torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[5, 6], [2, 7]]))  # agrees only at position 2
    c = (torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0, 6], [5, 7]]))  # agrees only at position 1
    w = trust_matrix([a, b, c])
    assert w[0, 2] > w[0, 1]
    assert torch.allclose(w.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_mix_is_the_trust_weighted_label():
    w = 0.593122
    v, i = mix([w, 1 - w], [A, B], k=3, vocab=4)
    got = dict(zip(i[0].tolist(), v[0].tolist()))
    assert got[0] == pytest.approx(w * 0.5 + (1 - w) * 0.8, abs=1e-5)
    assert got[1] == pytest.approx(w * 0.5, abs=1e-5)
    assert got[2] == pytest.approx((1 - w) * 0.2, abs=1e-5)
    assert consensus_gap([(v, i), (v, i)]) == pytest.approx(0.0, abs=1e-6)
    assert consensus_gap([A, B]) == pytest.approx(0.5, abs=1e-6)  # (|.5-.8| + |.5-0| + |0-.2|) / 2


@pytest.mark.parametrize("values, step", [("fp16", 1e-3), ("uint8", 1 / 255)])
@pytest.mark.parametrize("vocab, id_bytes", [(49_152, 2), (65_536, 2), (65_537, 4)])
def test_payload_round_trip_and_size(values, step, vocab, id_bytes):
    """Ids travel in two bytes while the vocabulary fits in 16 bits (the last id, 65,535, too),
    in four beyond; decoded exactly either way."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(64, 10, generator=g), dim=-1).topk(4)
    ids = p.indices.clone()
    ids[0, 0] = vocab - 1  # the largest id this vocabulary has
    payload = encode_predictions((p.values, ids), values)
    v, i = decode_predictions(payload)
    assert torch.equal(i, ids) and i.dtype == torch.int64
    assert (v - p.values).abs().max() <= step
    width = 2 if values == "fp16" else 1
    assert len(payload) >= 64 * 4 * (id_bytes + width)  # the ids + the values, plus a small header
    assert len(payload) < 64 * 4 * (id_bytes + width) + 200


def test_distill_loss_zero_when_model_matches_the_label():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
    exact = (torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0, 1, 2]]))
    assert distill_loss(logits, exact).item() == pytest.approx(0.0, abs=1e-6)
    off = (torch.tensor([[0.1, 0.2, 0.7]]), torch.tensor([[0, 1, 2]]))
    assert distill_loss(logits, off).item() > 0.1


def test_tokenizer_mismatch_refused_by_name(tiny_cfg):
    with pytest.raises(ConfigError) as e:
        tiny_cfg("strategy.name=trust_distill", 'strategy.parties=[{}, {"model": "smollm2"}, {}, {}]')
    msg = str(e.value)
    assert "tokenizer" in msg and "SmolLM2" in msg and "byte-level (tiny)" in msg


def test_engines_and_sampling_it_cannot_run_are_refused_by_name(tiny_cfg):
    """A swarm of peers has no server to mix predictions; sampling and simulated faults would be
    ignored by the loop (every party works every round), so they are refused, not dropped."""
    with pytest.raises(ConfigError, match="trust_distill.*own model"):
        tiny_cfg("strategy.name=trust_distill", "engine.name=p2p-local")
    for over in ("sampling.dropout=0.25", "sampling.fraction=0.5"):
        with pytest.raises(ConfigError, match=over.split("=")[0]):
            tiny_cfg("strategy.name=trust_distill", over)
    tiny_cfg("strategy.name=trust_distill", "engine.name=flower-sim")  # its parties on their SuperNodes


def test_public_corpus_must_not_be_client_data(tiny_cfg):
    with pytest.raises(ConfigError, match="strategy.public"):
        tiny_cfg("strategy.name=trust_distill", "strategy.public=stdlib")
    with pytest.raises(ConfigError, match="unknown keys"):
        tiny_cfg("strategy.name=trust_distill", 'strategy.parties=[{"depth": 2}]')


def test_one_party_per_client():
    from fedtune.strategies.trust_distill import TrustDistill

    assert TrustDistill(parties=[{}, {"layers": 1}]).network_problems(["a", "b"], 0) == []
    [p] = TrustDistill(parties=[{}]).network_problems(["a", "b"], 0)
    assert p.field == "strategy.parties" and "2 clients" in p.constraint
