import torch

from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.local import Local
from fedtune.types import ClientUpdate


def rand_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g), "a.lora_B.weight": torch.randn(6, 4, generator=g)}


def test_fedavg_is_the_example_weighted_mean() -> None:
    g = torch.Generator().manual_seed(0)
    glob = rand_state(g)
    deltas = [rand_state(g) for _ in range(3)]
    ns = [10, 30, 60]
    ups = [ClientUpdate(f"c{i}", d, n) for i, (d, n) in enumerate(zip(deltas, ns))]
    strat = FedAvg()
    res = strat.aggregate(1, ups, strat.init_state(glob))
    new, state = res.global_state, res.state
    for k in glob:
        expected = glob[k] + sum(n / 100 * d[k] for d, n in zip(deltas, ns))
        torch.testing.assert_close(new[k], expected, rtol=1e-6, atol=1e-6)
    assert state["global"] is new


def test_fedavg_does_not_depend_on_client_order() -> None:
    g = torch.Generator().manual_seed(1)
    glob = rand_state(g)
    ups = [ClientUpdate(f"c{i}", rand_state(g), 7 + i) for i in range(5)]
    strat = FedAvg()
    res = strat.aggregate(1, ups, strat.init_state(glob))
    a, _ = res.global_state, res.state
    res = strat.aggregate(1, ups[::-1], strat.init_state(glob))
    b, _ = res.global_state, res.state
    for k in a:
        assert torch.equal(a[k], b[k])  # bit-identical, not just close


def test_fedavg_with_no_updates_keeps_the_global_model() -> None:
    glob = rand_state(torch.Generator().manual_seed(2))
    strat = FedAvg()
    res = strat.aggregate(1, [], strat.init_state(glob))
    new, _ = res.global_state, res.state
    assert new is glob


def test_local_keeps_each_clients_own_adapter() -> None:
    g = torch.Generator().manual_seed(3)
    init = rand_state(g)
    strat = Local()
    state = strat.init_state(init)
    d0, d1 = rand_state(g), rand_state(g)
    res = strat.aggregate(1, [ClientUpdate("c0", d0, 1), ClientUpdate("c1", d1, 1)], state)
    _, state = res.global_state, res.state
    sent = strat.configure(2, ["c0", "c1", "c2"], state)
    torch.testing.assert_close(sent["c0"]["a.lora_B.weight"], init["a.lora_B.weight"] + d0["a.lora_B.weight"])
    torch.testing.assert_close(sent["c1"]["a.lora_B.weight"], init["a.lora_B.weight"] + d1["a.lora_B.weight"])
    assert sent["c2"] is init  # never trained: still the initial adapter
