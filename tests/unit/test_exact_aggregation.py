"""Exactness of LoRA aggregation on random factors (algorithms.md section 3)."""

import pytest
import torch

from fedtune.strategies.base import STRATEGIES
from fedtune.strategies.lora_math import covariance_error, mean_of_products, products
from fedtune.types import ClientUpdate, add_states, sub_states

MODULES = ["m.layers.0.q_proj", "m.layers.1.v_proj"]


def lora_state(g: torch.Generator, r: int = 4, d: int = 12, k: int = 10, a: torch.Tensor | None = None) -> dict:
    s = {}
    for m in MODULES:
        s[m + ".lora_A.weight"] = a if a is not None else torch.randn(r, k, generator=g, dtype=torch.float64).float()
        s[m + ".lora_B.weight"] = torch.randn(d, r, generator=g, dtype=torch.float64).float()
    return s


def run(name: str, glob: dict, clients: list[dict], ns: list[int]) -> dict:
    strat = STRATEGIES.get(name)()
    state = strat.init_state(glob)
    sent = strat.configure(1, [f"c{i}" for i in range(len(clients))], state)
    ups = []
    for i, (c, n) in enumerate(zip(clients, ns)):
        received = sent[f"c{i}"]
        ups.append(ClientUpdate(f"c{i}", {k: c[k] - received[k] for k in received}, n))
    res = strat.aggregate(1, ups, state)
    new, _ = res.global_state, res.state
    return new


def test_fedit_error_equals_the_covariance_formula() -> None:
    g = torch.Generator().manual_seed(0)
    glob = lora_state(g)
    clients = [lora_state(g) for _ in range(3)]
    ns = [5, 3, 2]
    p = [n / 10 for n in ns]
    new = run("fedit", glob, clients, ns)
    exact = mean_of_products(clients, p)
    got = products(new)
    cov = covariance_error(clients, p)
    for m in MODULES:
        torch.testing.assert_close(exact[m] - got[m], cov[m], rtol=1e-5, atol=1e-5)
        assert cov[m].norm() > 0.1 * exact[m].norm()  # and the error is not negligible


def test_ffa_lora_is_exact_and_sends_only_b() -> None:
    g = torch.Generator().manual_seed(1)
    glob = lora_state(g)
    shared_a = {m: glob[m + ".lora_A.weight"] for m in MODULES}
    clients = []
    for _ in range(4):
        c = lora_state(g)
        for m in MODULES:  # A is frozen: every client still has the shared A
            c[m + ".lora_A.weight"] = shared_a[m]
        clients.append(c)
    ns = [1, 2, 3, 4]
    new = run("ffa_lora", glob, clients, ns)
    exact = mean_of_products(clients, [n / 10 for n in ns])
    got = products(new)
    for m in MODULES:
        torch.testing.assert_close(got[m], exact[m], rtol=1e-6, atol=1e-6)
    sent = STRATEGIES.get("ffa_lora")().configure(1, ["c0"], {"global": glob})["c0"]
    assert sorted(sent) == sorted(m + ".lora_B.weight" for m in MODULES)


@pytest.mark.parametrize("name", ["fedavg", "fedit", "ffa_lora"])
def test_aggregation_ignores_client_order(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    glob = lora_state(g)
    ups = [ClientUpdate(f"c{i}", sub_states(lora_state(g), glob), i + 1) for i in range(4)]
    strat = STRATEGIES.get(name)()
    ups = [
        ClientUpdate(
            u.client_id,
            {k: v for k, v in u.delta.items() if k in strat.configure(1, ["x"], strat.init_state(glob))["x"]},
            u.num_examples,
        )
        for u in ups
    ]
    res = strat.aggregate(1, ups, strat.init_state(glob))
    a, _ = res.global_state, res.state
    res = strat.aggregate(1, ups[::-1], strat.init_state(glob))
    b, _ = res.global_state, res.state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert add_states(glob, {}) == glob
