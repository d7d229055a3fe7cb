"""PCL trust weights equal their formulas on hand-made inputs; TAC recovers planted clusters;
CoMiGS averages only the generalists and refuses more generalists than experts."""

import math

import numpy as np
import pytest
import torch

from fedtune.strategies.base import RunContext
from fedtune.strategies.personal import (
    PCL,
    TAC,
    CoMiGS,
    kmeans,
    pcl_weights,
    topk_l1_distances,
    weight_similarity,
)
from fedtune.types import ClientUpdate


def update(cid: str, delta: dict, n: int = 10) -> ClientUpdate:
    return ClientUpdate(cid, delta, n, {"train_loss": 0.0}, 0, 0)


def test_weight_similarity_is_the_mean_row_cosine() -> None:
    a = {"m.A": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "m.B": torch.tensor([[3.0, 4.0]])}
    b = {"m.A": torch.tensor([[1.0, 1.0], [0.0, -1.0]]), "m.B": torch.tensor([[4.0, 3.0]])}
    s = weight_similarity([a, b])
    # rows: A row 0 cos = 1/sqrt2, A row 1 cos = -1, B row 0 cos = 24/25; 3 rows in total
    expect = (1 / math.sqrt(2) - 1 + 24 / 25) / 3
    assert float(s[0, 1]) == pytest.approx(expect) and float(s[1, 0]) == pytest.approx(expect)
    assert float(s[0, 0]) == pytest.approx(1.0)
    w = pcl_weights("weights", s)
    e = math.exp(expect)
    assert float(w[0, 0]) == pytest.approx(math.e / (math.e + e))


def test_validation_trust_is_softmax_of_minus_perplexity() -> None:
    ppl = torch.tensor([[10.0, 11.0, 14.0], [12.0, 10.5, 10.0], [30.0, 30.0, 29.0]], dtype=torch.float64)
    w = pcl_weights("val", -ppl)
    row = torch.exp(-ppl[0]) / torch.exp(-ppl[0]).sum()
    torch.testing.assert_close(w[0], row)
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))


def test_prediction_trust_from_top_k_logits() -> None:
    # 2 positions, vocab 4, top-2 logits of three models on one reference block
    vals = [torch.tensor([[[5.0, 1.0], [2.0, 1.0]]]), torch.tensor([[[5.0, 2.0], [2.0, 1.0]]]),
            torch.tensor([[[4.0, 3.0], [7.0, 1.0]]])]  # fmt: skip
    idx = [torch.tensor([[[0, 1], [2, 3]]]), torch.tensor([[[0, 2], [2, 3]]]), torch.tensor([[[3, 2], [0, 1]]])]
    d = topk_l1_distances(list(zip(vals, idx)), vocab=4)
    # position 0: l0 = [5,1,0,0], l1 = [5,0,2,0], l2 = [0,0,3,4]; position 1: [0,0,2,1], [0,0,2,1], [7,1,0,0]
    d01 = (0 + 1 + 2 + 0) + 0
    d02 = (5 + 1 + 3 + 4) + (7 + 1 + 2 + 1)
    d12 = (5 + 0 + 1 + 4) + (7 + 1 + 2 + 1)
    expect = torch.tensor([[0, d01, d02], [d01, 0, d12], [d02, d12, 0]], dtype=torch.float64) / 2
    torch.testing.assert_close(d, expect)
    w = pcl_weights("predictions", d, temperature=10.0)
    norm = expect / expect.sum(1, keepdim=True)
    torch.testing.assert_close(w, torch.softmax(-10 * norm, dim=1))


def test_pcl_mixes_weights_not_deltas() -> None:
    init = {"m.lora_A.weight": torch.zeros(1, 2)}
    pcl = PCL(trust="weights")
    state = pcl.init_state(init)
    ups = [update(c, {"m.lora_A.weight": torch.tensor([[v, 1.0]])}) for c, v in [("a", 1.0), ("b", -1.0), ("c", 2.0)]]
    res = pcl.aggregate(1, ups, state)
    _, state = res.global_state, res.state
    thetas = [u.delta["m.lora_A.weight"] for u in ups]
    w = torch.tensor(res.metrics["trust"], dtype=torch.float64)
    expect_w = pcl_weights("weights", weight_similarity([{"k": t} for t in thetas]))
    torch.testing.assert_close(w, expect_w, atol=1e-6, rtol=0)
    for i, cid in enumerate("abc"):
        mix = sum(float(expect_w[i, j]) * thetas[j] for j in range(3))
        torch.testing.assert_close(state["clients"][cid]["m.lora_A.weight"], mix.float())
    assert pcl.configure(2, ["b"], state)["b"] is state["clients"]["b"]


def test_tac_recovers_planted_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = {0: torch.full((4, 8), 1.0), 1: torch.full((4, 8), -1.0), 2: torch.zeros(4, 8)}
    truth = {"c0": 0, "c1": 1, "c2": 0, "c3": 2, "c4": 1, "c5": 2, "c6": 0}
    init = {"m.lora_B.weight": torch.zeros(4, 8)}
    ups = [
        update(c, {"m.lora_B.weight": centers[k] + 0.05 * torch.randn(4, 8, generator=gen)}, n=1 + i)
        for i, (c, k) in enumerate(truth.items())
    ]
    tac = TAC(clusters=3, ctx=RunContext(seed=0))
    res = tac.aggregate(1, ups, tac.init_state(init))
    _, state = res.global_state, res.state
    found = res.metrics["clusters"]
    groups = {frozenset(c for c in truth if truth[c] == k) for k in range(3)}
    assert {frozenset(c for c in found if found[c] == k) for k in range(3)} == groups
    members = [u for u in ups if truth[u.client_id] == 0]
    n = sum(u.num_examples for u in members)
    mean = sum(u.num_examples / n * u.delta["m.lora_B.weight"] for u in members)
    for u in members:
        torch.testing.assert_close(state["clients"][u.client_id]["m.lora_B.weight"], mean)


def test_kmeans_is_seeded_and_labels_are_canonical() -> None:
    x = np.array([[0.0], [0.1], [5.0], [5.1], [0.05]])
    a = kmeans(x, 2, np.random.default_rng(0))
    b = kmeans(x, 2, np.random.default_rng(123))
    assert a.tolist() == b.tolist() == [0, 0, 1, 1, 0]


def test_comigs_averages_generalists_only() -> None:
    key = "model.layers.0.mlp.inner.up_proj.moe_lora_B.{}"
    init = {
        key.format(0): torch.zeros(2, 2),
        key.format(1): torch.zeros(2, 2),
        "model.layers.0.mlp.moe_router.weight": torch.zeros(2, 4),
    }
    s = CoMiGS(preset="1G1S")
    state = s.init_state(init)
    assert set(state["global"]) == {key.format(0)}
    assert s.private_keys(init) == {key.format(1), "model.layers.0.mlp.moe_router.weight"}
    ups = [update("a", {key.format(0): torch.ones(2, 2)}, 1), update("b", {key.format(0): 3 * torch.ones(2, 2)}, 9)]
    res = s.aggregate(1, ups, state)
    new, _ = res.global_state, res.state
    torch.testing.assert_close(new[key.format(0)], 2 * torch.ones(2, 2))  # uniform, as the paper
    assert CoMiGS(preset="2G").private_keys(init) == {"model.layers.0.mlp.moe_router.weight"}
    assert CoMiGS(preset="2S").init_state(init)["global"] == {}


def test_comigs_refuses_more_generalists_than_experts(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.generalists"):
        tiny_cfg(
            "adapter.kind=moe_lora", "strategy.name=comigs", "strategy.generalists=2", "adapter.experts=[1, 2, 2, 2]"
        )
    with pytest.raises(ConfigError, match="adapter.kind"):
        tiny_cfg("strategy.name=comigs")


def test_safari_substitutes_the_most_similar_clients_update_for_a_missing_one() -> None:
    from fedtune.strategies.safari import Safari

    key = "m.lora_B.weight"
    s = Safari(neighbours=1)
    state = s.init_state({key: torch.zeros(1, 3)})
    r1 = [
        update("a", {key: torch.tensor([[1.0, 0.0, 0.0]])}, 10),
        update("b", {key: torch.tensor([[0.9, 0.1, 0.0]])}, 30),  # b moves like a
        update("c", {key: torch.tensor([[0.0, 0.0, 1.0]])}, 20),
    ]
    res = s.aggregate(1, r1, state)
    g1, state = res.global_state, res.state
    torch.testing.assert_close(g1[key], (10 * r1[0].delta[key] + 30 * r1[1].delta[key] + 20 * r1[2].delta[key]) / 60)
    # round 2: b's update is lost; a (most similar to b) stands in for it, with b's weight
    r2 = [
        update("a", {key: torch.tensor([[2.0, 0.0, 0.0]])}, 10),
        update("c", {key: torch.tensor([[0.0, 0.0, 4.0]])}, 20),
    ]
    res = s.aggregate(2, r2, state)
    g2, state = res.global_state, res.state
    expect = g1[key] + (10 * r2[0].delta[key] + 30 * r2[0].delta[key] + 20 * r2[1].delta[key]) / 60
    torch.testing.assert_close(g2[key], expect)
    assert res.metrics == {"surrogates": {"b": ["a"]}}
