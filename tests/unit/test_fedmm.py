"""FedMM for adapters (arXiv:2110.08477): the party's local round (labels of unlabelled parties
never reach the loss; dual and message as the paper's update), the server's average, the
domain-shift data and the refusals."""

from __future__ import annotations

import random

import pytest
import torch

from fedtune.client.train import TrainSpec
from fedtune.data.blocks import Shard
from fedtune.strategies.base import RunContext
from fedtune.strategies.fedmm import FedMM
from fedtune.strategies.fedmm_client import DISC, DUAL, prompt_positions
from fedtune.types import ClientUpdate

SPEC = TrainSpec(steps=3, batch_size=4, lr=0.05, optimizer="sgd", max_grad_norm=None)


def chat_shard(cid: str, answer_seed: int) -> Shard:
    """8 right-padded examples of 16 tokens: a 10-token prompt (fixed), a 3-token answer (drawn
    from `answer_seed`), then padding."""
    prompts = torch.randint(5, 250, (8, 10), generator=torch.Generator().manual_seed(7))
    answers = torch.randint(5, 250, (8, 3), generator=torch.Generator().manual_seed(answer_seed))
    blocks = torch.cat([prompts, answers, torch.zeros(8, 3, dtype=torch.long)], dim=1)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, 10:13] = True
    return Shard(cid, blocks, blocks[:2], blocks[:2], 8, train_mask=mask, val_mask=mask[:2], test_mask=mask[:2])


def strategy(model, **kw) -> FedMM:  # type: ignore[no-untyped-def]
    return FedMM(ctx=RunContext(seed=0, hidden_size=int(model.config.hidden_size)), disc_width=8, **kw)


def one_round(s: FedMM, model, init, shard: Shard, private=None):  # type: ignore[no-untyped-def]
    sent = s.configure(1, [shard.client_id], s.init_state(init))[shard.client_id]
    return s.client_train(model, sent, private or {}, shard, SPEC, 0, 1)


def test_prompt_positions_stop_at_the_answer() -> None:
    mask = torch.tensor([[False, False, True, True, False], [False, True, False, False, False]])

    assert prompt_positions(mask).tolist() == [[True, True, False, False, False], [True, False, False, False, False]]


def test_unlabelled_party_labels_never_reach_the_loss(tiny_with_lora) -> None:
    model, init = tiny_with_lora()
    s = strategy(model)

    a = one_round(s, model, init, chat_shard("target", 1))
    b = one_round(s, model, init, chat_shard("target", 2))  # other answers, same prompts
    la = one_round(s, model, init, chat_shard("source-0", 1))
    lb = one_round(s, model, init, chat_shard("source-0", 2))

    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1]["disc_loss"] == b[1]["disc_loss"] and "train_loss" not in a[1]
    assert any(not torch.equal(la[0][k], lb[0][k]) for k in la[0] if not k.startswith(DISC))  # labelled: they do


def test_first_round_message_is_v_plus_dual_over_mu(tiny_with_lora) -> None:
    model, init = tiny_with_lora()
    s = strategy(model, mu=2.0)

    delta, metrics, private = one_round(s, model, init, chat_shard("source-0", 1))

    # lam = 0 + mu (v - v_bar), z - v_bar = (v - v_bar) + lam / mu = 2 lam / mu
    assert set(delta) == {k[len(DUAL) :] for k in private} and any(k.startswith(DISC) for k in delta)
    for k, d in delta.items():
        assert torch.allclose(d, 2 * private[DUAL + k] / 2.0, atol=1e-6)
    assert metrics["dual_norm"] > 0


def test_second_round_uses_the_stored_duals(tiny_with_lora) -> None:
    model, init = tiny_with_lora()
    s = strategy(model)
    shard = chat_shard("source-1", 1)
    _, _, private = one_round(s, model, init, shard)

    with_duals = one_round(s, model, init, shard, private)[0]
    without = one_round(s, model, init, shard)[0]
    gda = one_round(strategy(model, method="gda"), model, init, shard)[0]

    assert any(not torch.allclose(with_duals[k], without[k]) for k in without)
    assert any(not torch.allclose(gda[k], without[k]) for k in without)  # the mu (v - v_bar) term acts


def test_source_only_leaves_the_unlabelled_party_out(tiny_with_lora) -> None:
    model, init = tiny_with_lora()
    s = strategy(model, method="source_only")
    state = s.init_state(init)

    d_t, m_t, _ = one_round(s, model, init, chat_shard("target", 1))
    d_s, _, _ = one_round(s, model, init, chat_shard("source-0", 1))
    agg = s.aggregate(1, [ClientUpdate("target", d_t, 8), ClientUpdate("source-0", d_s, 8)], state)

    assert m_t["steps"] == 0 and not any(k.startswith(DISC) for k in d_s) and "domain_acc" not in agg.metrics
    assert all(torch.allclose(agg.global_state[k], init[k] + d_s[k]) for k in d_s)
    assert all(torch.equal(agg.state["disc"][k], state["disc"][k]) for k in state["disc"])


def test_server_averages_adapter_and_discriminator_uniformly() -> None:
    s = FedMM(ctx=RunContext(hidden_size=4), disc_width=2)
    state = s.init_state({"a.lora_A.weight": torch.zeros(2, 2)})
    ups = [
        ClientUpdate(c, {"a.lora_A.weight": torch.full((2, 2), v), DISC + "b2": torch.tensor([v])}, n)
        for c, v, n in [("source-0", 1.0, 100), ("target", 3.0, 1)]
    ]

    agg = s.aggregate(1, ups, state)

    assert torch.allclose(agg.global_state["a.lora_A.weight"], torch.full((2, 2), 2.0))  # not example-weighted
    assert torch.allclose(agg.state["disc"][DISC + "b2"], torch.tensor([2.0]))
    assert not any(k.startswith(DISC) for k in agg.global_state)  # evaluation and export see the adapter only


def test_shifted_rows_put_noisy_posts_of_all_topics_on_the_target() -> None:
    from fedtune.config.schema import DataConfig
    from fedtune.data.shift import char_noise, shifted_rows

    texts = [f"post number {i} about things and more words here" for i in range(40)]
    labels = ["a", "b", "c", "d"] * 10
    cfg = DataConfig(source="20newsgroups-shift", shift={"groups": [["a", "b"], ["c"]], "noise": 0.5})

    ds = shifted_rows(texts, labels, cfg)

    parties = dict(zip(ds["text"], ds["label"]))
    assert set(ds["label"]) == {"source-0", "source-1", "target"}
    assert sum(p == "target" for p in ds["label"]) == 15  # half of each of the 30 posts of a, b, c
    assert all(t in texts for t, p in parties.items() if p != "target")  # sources: untouched posts
    assert not any(t in texts for t, p in parties.items() if p == "target")  # target: noised
    noisy = char_noise("a" * 10000, 0.3, random.Random(0))
    assert 0.25 < sum(c != "a" for c in noisy) / 10000 < 0.31  # 0.3 * 25/26 of the letters change


def test_fedmm_is_refused_where_its_state_cannot_live(tiny_cfg) -> None:
    from fedtune.components import check_engine

    cfg = tiny_cfg("strategy.name=fedmm")

    problems = check_engine(cfg, "flower-sim")

    assert any(p.field == "engine.name" and "dual variables" in p.constraint for p in problems)
    assert not [p for p in check_engine(cfg, "inprocess") if "dual" in p.constraint]


def test_unknown_unlabelled_party_is_a_config_problem() -> None:
    s = FedMM(unlabelled=("nobody",))

    problems = s.network_problems(["source-0", "source-1"], 0)

    assert problems and problems[0].field == "strategy.unlabelled" and "nobody" in problems[0].constraint


def test_shift_goes_with_its_source() -> None:
    from pydantic import ValidationError

    from fedtune.config.schema import DataConfig

    with pytest.raises(ValidationError, match="data.shift"):
        DataConfig(source="20newsgroups-instruct", shift={"groups": [["sci.med"]]})


def test_raw_text_or_loss_on_all_is_refused_by_the_step() -> None:
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match="loss_on: completion"):
        prompt_positions(torch.ones(2, 5, dtype=torch.bool))  # loss on every token: no prompt to pool
