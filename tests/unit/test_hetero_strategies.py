import torch

from fedtune.strategies.base import STRATEGIES, RunContext
from fedtune.strategies.fair import fair_correction
from fedtune.strategies.lora_math import mean_of_products, products, relative_error
from fedtune.types import ClientUpdate

M = "m.0.q_proj"
S = 2.0


def factors(g, r, d=12, k=10):
    return {M + ".lora_A.weight": torch.randn(r, k, generator=g), M + ".lora_B.weight": torch.randn(d, r, generator=g)}


def updates_for(strategy, state, trained):
    sent = strategy.configure(1, list(trained), state)
    return [ClientUpdate(c, {k: trained[c][k] - v for k, v in sent[c].items()}, 1) for c in trained], sent


def test_flexlora_gives_each_client_the_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(0)
    ranks = {"c0": 2, "c1": 3, "c2": 6}
    strat = STRATEGIES.get("flexlora")(ctx=RunContext(lora_scale=S, client_ranks=ranks))
    state = strat.init_state(factors(g, 6))
    trained = {c: factors(g, r) for c, r in ranks.items()}
    ups, _ = updates_for(strat, state, trained)
    res = strat.aggregate(1, ups, state)
    new, state = res.global_state, res.state
    dw = S * sum(t[M + ".lora_B.weight"].double() @ t[M + ".lora_A.weight"].double() for t in trained.values()) / 3
    # sum of ranks 11 > max rank 6: the global is the best rank-6 approximation (Eckart-Young)
    sv = torch.linalg.svdvals(dw)
    got = S * new[M + ".lora_B.weight"].double() @ new[M + ".lora_A.weight"].double()
    torch.testing.assert_close((dw - got).norm(), sv[6:].norm(), rtol=1e-4, atol=1e-5)
    two = strat.configure(2, ["c0"], state)["c0"]
    got2 = S * two[M + ".lora_B.weight"].double() @ two[M + ".lora_A.weight"].double()
    torch.testing.assert_close((dw - got2).norm(), sv[2:].norm(), rtol=1e-4, atol=1e-5)
    assert 0 < res.metrics["agg_error"] < 1


def test_hetlora_weights_tensors_by_norm_and_pads() -> None:
    g = torch.Generator().manual_seed(1)
    ranks = {"c0": 2, "c1": 4}
    strat = STRATEGIES.get("hetlora")(ctx=RunContext(client_ranks=ranks))
    state = strat.init_state(factors(g, 4))
    trained = {c: factors(g, r) for c, r in ranks.items()}
    ups, _ = updates_for(strat, state, trained)
    res = strat.aggregate(1, ups, state)
    new, state = res.global_state, res.state
    a0 = torch.zeros(4, 10)
    a0[:2] = trained["c0"][M + ".lora_A.weight"]
    a1 = trained["c1"][M + ".lora_A.weight"]
    w0, w1 = a0.norm(), a1.norm()
    torch.testing.assert_close(new[M + ".lora_A.weight"], (w0 * a0 + w1 * a1) / (w0 + w1))


def test_hetlora_prunes_a_rank_whose_tail_is_weaker_than_the_global() -> None:
    g = torch.Generator().manual_seed(2)
    ranks = {"c0": 4, "c1": 4}
    strat = STRATEGIES.get("hetlora")(ctx=RunContext(client_ranks=ranks), prune_gamma=0.75)
    state = strat.init_state(factors(g, 4))
    trained = {c: factors(g, 4) for c in ranks}
    trained["c0"][M + ".lora_A.weight"][3] = 0.0  # c0's last rank carries nothing
    ups, _ = updates_for(strat, state, trained)
    res = strat.aggregate(1, ups, state)
    _, state = res.global_state, res.state
    assert state["ranks"]["c0"] == 3 and state["ranks"]["c1"] == 4
    assert strat.configure(2, ["c0"], state)["c0"][M + ".lora_A.weight"].shape == (3, 10)


def test_hetlora_penalty_is_the_tail_product() -> None:
    g = torch.Generator().manual_seed(3)
    f = factors(g, 4)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in f.items()}
    pen = STRATEGIES.get("hetlora")(prune_lambda=0.5, prune_gamma=0.5).client_penalty(params, f)
    expected = 0.5 * f[M + ".lora_A.weight"][2:].norm() * f[M + ".lora_B.weight"][:, 2:].norm()
    torch.testing.assert_close(pen(), expected)


def test_lora_fair_correction_reduces_the_aggregation_error() -> None:
    g = torch.Generator().manual_seed(4)
    glob = factors(g, 4)
    clients = [factors(g, 4) for _ in range(3)]
    for objective in ("frobenius", "cosine"):
        strat = STRATEGIES.get("lora_fair")(objective=objective, steps=200, server_lr=0.05, lam=1e-4)
        state = strat.init_state(glob)
        ups = [ClientUpdate(f"c{i}", {k: c[k] - glob[k] for k in c}, 1) for i, c in enumerate(clients)]
        res = strat.aggregate(1, ups, state)
        new, state = res.global_state, res.state
        m = res.metrics
        assert m["agg_error"] < 0.9 * m["agg_error_fedit"], objective
        exact = mean_of_products(clients, [1 / 3] * 3)
        assert abs(relative_error(exact, products(new)) - m["agg_error"]) < 1e-6


def test_fair_frobenius_reaches_the_least_squares_solution() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 8, generator=g)
    b = torch.randn(6, 3, generator=g)
    t = torch.randn(6, 8, generator=g)
    db = fair_correction(t, a, b, "frobenius", lam=0.0, steps=3000, lr=0.01)
    closed = (t - b @ a) @ a.T @ torch.linalg.inv(a @ a.T)  # argmin ||t - (b + dB) a||_F
    torch.testing.assert_close(db, closed, rtol=1e-2, atol=1e-2)
