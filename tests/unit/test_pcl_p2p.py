"""PCL's peer form (strategies/pcl_p2p.py): each receiver's trust row over the models that reached
it, by hand for both trusts; push-sum refused; 'val' needs the receiver's own scores."""

import math

import pytest
import torch

from fedtune.client.run import PeerState
from fedtune.recipes.decentralized import exchange
from fedtune.strategies.base import RunContext
from fedtune.strategies.pcl_p2p import PCLP2P

KEY = "m.lora_A.weight"


def pcl(**params) -> PCLP2P:
    return PCLP2P(topology="complete", ctx=RunContext(client_ids=("a", "b", "c")), **params)


def test_weights_trust_is_the_softmax_of_the_adapters_cosine_by_hand() -> None:
    """Three peers on a complete graph, one-row adapters a = [1, 0], b = [0, 1], c = [1, 1]: a's
    cosines to (a, b, c) are (1, 0, 1/sqrt 2), so a's row is softmax(1, 0, 0.7071) and its new
    adapter sum_i W_ai x_i."""
    x = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]}
    trained = {p: PeerState({KEY: torch.tensor([v])}) for p, v in x.items()}
    mixed, per_peer, _ = exchange(pcl(), 1, trained)
    e = [math.exp(1.0), 1.0, math.exp(1 / math.sqrt(2))]
    w = [v / sum(e) for v in e]
    want = [w[0] * 1 + w[2] * 1, w[1] * 1 + w[2] * 1]
    torch.testing.assert_close(mixed["a"].x[KEY], torch.tensor([want]), rtol=1e-6, atol=0)
    assert per_peer["a"]["bytes_down"] > 0  # the trust needs nothing but the messages that came


def test_val_trust_is_the_softmax_of_minus_perplexity_by_hand() -> None:
    """Receiver a scored (a, b, c) at losses (log 2, log 4, log 3) on its own data: perplexities
    2, 4, 3, row softmax(-2, -4, -3)."""
    s = pcl(trust="val")
    own = PeerState({KEY: torch.tensor([[1.0]])})
    inbox = {"b": {KEY: torch.tensor([[5.0]])}, "c": {KEY: torch.tensor([[9.0]])}}
    coef = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert sorted(s.to_score(1, "a", own, inbox)) == ["a", "b", "c"]
    out, _ = s.mix("a", own, inbox, coef, {"a": math.log(2), "b": math.log(4), "c": math.log(3)})
    e = [math.exp(-2), math.exp(-4), math.exp(-3)]
    want = (e[0] * 1 + e[1] * 5 + e[2] * 9) / sum(e)
    assert out.x[KEY].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="needs the engine"):
        s.mix("a", own, inbox, coef, None)
    assert s.capabilities.scores_peers and not pcl().capabilities.scores_peers


def test_a_lost_message_leaves_the_row_and_push_sum_is_refused(tiny_cfg) -> None:
    from fedtune import components

    s = pcl()
    own = PeerState({KEY: torch.tensor([[1.0, 0.0]])})
    inbox = {"b": {KEY: torch.tensor([[0.0, 1.0]])}}  # c's message was lost
    out, _ = s.mix("a", own, inbox, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    w_a = math.e / (math.e + 1)
    torch.testing.assert_close(out.x[KEY], torch.tensor([[w_a, 1 - w_a]], dtype=torch.float32))
    cfg = tiny_cfg("strategy.name=pcl_p2p", "strategy.mixing=push_sum", "strategy.topology=ring")
    problems = components.per_client_problems(cfg, ["a", "b", "c", "d"])  # what validate and run check
    assert [p.field for p in problems] == ["strategy.mixing"] and "push-sum" in problems[0].constraint
