"""FedEx-LoRA and FLoRA are exact: after aggregation the global effective update
base_delta + s B A equals the previous one plus s * sum_k p_k B_k A_k."""

import pytest
import torch

from fedtune.models.adapters import BASE_DELTA, fold_base_deltas
from fedtune.strategies.base import STRATEGIES, RunContext
from fedtune.strategies.lora_math import lora_modules
from fedtune.types import ClientUpdate

MODULES = ["m.0.q_proj", "m.1.v_proj"]
S = 2.0


def lora_state(g, r=4, d=12, k=10):
    s = {}
    for m in MODULES:
        s[m + ".lora_A.weight"] = torch.randn(r, k, generator=g)
        s[m + ".lora_B.weight"] = torch.randn(d, r, generator=g)
    return s


def effective(state, m):
    base = state.get(m + BASE_DELTA, torch.zeros(12, 10)).double()
    return base + S * state[m + ".lora_B.weight"].double() @ state[m + ".lora_A.weight"].double()


def aggregate(strategy, glob, trained, ns):
    state = strategy.init_state(glob)
    ids = [f"c{i}" for i in range(len(trained))]
    sent = strategy.configure(1, ids, state)
    ups = []
    for cid, t, n in zip(ids, trained, ns):
        received = {k: v for k, v in sent[cid].items() if not k.endswith(BASE_DELTA)}
        ups.append(
            ClientUpdate(cid, {k: t[k][tuple(slice(0, x) for x in v.shape)] - v for k, v in received.items()}, n)
        )
    return state, sent, strategy.aggregate(1, ups, state).global_state


def test_fedex_is_exact_and_keeps_the_factor_average() -> None:
    g = torch.Generator().manual_seed(0)
    glob = lora_state(g)
    trained = [lora_state(g) for _ in range(3)]
    ns = [2, 3, 5]
    state, _, new = aggregate(STRATEGIES.get("fedex_lora")(ctx=RunContext(lora_scale=S)), glob, trained, ns)
    for m in MODULES:
        target = effective(state["global"], m) - effective(state["global"], m)  # zero base at start
        target = target + sum(
            n / 10 * S * t[m + ".lora_B.weight"].double() @ t[m + ".lora_A.weight"].double()
            for t, n in zip(trained, ns)
        )
        torch.testing.assert_close(effective(new, m), target, rtol=1e-5, atol=1e-5)
        a_bar = sum(n / 10 * t[m + ".lora_A.weight"] for t, n in zip(trained, ns))
        torch.testing.assert_close(new[m + ".lora_A.weight"], a_bar, rtol=1e-5, atol=1e-6)


def test_flora_is_exact_with_heterogeneous_ranks_and_restarts_lora() -> None:
    g = torch.Generator().manual_seed(1)
    glob = lora_state(g, r=8)
    ranks = {"c0": 2, "c1": 4, "c2": 8}
    strat = STRATEGIES.get("flora")(ctx=RunContext(lora_scale=S, seed=0, client_ranks=ranks))
    trained = [lora_state(g, r=8) for _ in range(3)]
    ns = [1, 1, 2]
    state, sent, new = aggregate(strat, glob, trained, ns)
    assert sent["c0"]["m.0.q_proj.lora_A.weight"].shape == (2, 10)  # a rank-2 client gets rank-2 factors
    assert sent["c1"]["m.0.q_proj.lora_B.weight"].shape == (12, 4)
    for m in MODULES:
        target = sum(
            n / 4 * S * t[m + ".lora_B.weight"][:, :r].double() @ t[m + ".lora_A.weight"][:r].double()
            for t, n, r in zip(trained, ns, ranks.values())
        )
        torch.testing.assert_close(new[m + BASE_DELTA].double(), target, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(new[m + ".lora_B.weight"]) == 0  # fresh LoRA: B = 0
        assert not torch.equal(new[m + ".lora_A.weight"], glob[m + ".lora_A.weight"])


def test_export_folds_the_base_delta_exactly() -> None:
    g = torch.Generator().manual_seed(2)
    st = lora_state(g)
    for m in MODULES:
        st[m + BASE_DELTA] = torch.randn(12, 3, generator=g) @ torch.randn(3, 10, generator=g)
    folded, rank = fold_base_deltas(st, S)
    assert rank == 7  # rank(base) 3 + rank(BA) 4
    for m in lora_modules(folded):
        got = folded[m + ".lora_B.weight"].double() @ folded[m + ".lora_A.weight"].double()
        torch.testing.assert_close(got, effective(st, m), rtol=1e-4, atol=1e-4)


def test_heterogeneous_ranks_are_refused_by_a_single_rank_strategy() -> None:
    from fedtune.config import config_from_dict
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter.ranks .* needs one rank for all clients"):
        config_from_dict({"adapter": {"ranks": [2, 4]}, "strategy": {"name": "fedavg"}})
    config_from_dict({"adapter": {"ranks": [2, 4]}, "strategy": {"name": "flora"}, "data": {"source": "stdlib"}})
