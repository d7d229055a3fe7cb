"""Mixture-of-LoRA-experts adapter: routing, load balancing, masking, export; CoMiGS keeps its
specialists and router on the client (checked on the uplink bytes)."""

import itertools

import pytest
import torch
from torch import nn

from fedtune.adapters.moe_lora import (
    MoEBlock,
    expert_index,
    inject_moe_lora_,
    is_router_key,
    load_balancing_loss,
    moe_blocks,
    set_expert_count_,
)
from fedtune.config.schema import ModelConfig
from fedtune.models.load import load_model, tiny_dir


def tiny_model():
    mcfg = ModelConfig(name="tiny")
    return load_model(str(tiny_dir(mcfg, 0)), mcfg)


def logit_block(num_experts: int, top_k: int, router: str = "token") -> MoEBlock:
    """A block whose router logits are its input (gate = identity), to feed chosen logits."""
    block = MoEBlock(nn.Identity(), num_experts, num_experts, top_k, router)
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(num_experts))
    return block


@pytest.mark.parametrize(("experts", "top_k", "router"), [(3, 1, "token"), (3, 2, "token"), (4, 4, "sequence")])
def test_router_weights_sum_to_one_over_the_top_k(experts: int, top_k: int, router: str) -> None:
    block = logit_block(experts, top_k, router)
    g = torch.randn(2, 7, experts, generator=torch.Generator().manual_seed(0))
    w, _ = block.routing(g)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7))
    assert ((w > 0).sum(-1) == top_k).all()  # exactly k experts mixed per token
    if router == "token":  # softmax over the selected logits
        top = g.topk(top_k, dim=-1)
        torch.testing.assert_close(w.gather(-1, top.indices), torch.softmax(top.values, -1))


def test_masked_experts_get_no_weight() -> None:
    block = logit_block(4, 2)
    block.expert_mask[2:] = False  # a client with 2 of the 4 experts
    g = torch.tensor([[[0.0, 0.1, 5.0, 9.0]]])
    w, _ = block.routing(g)
    assert w[..., 2:].abs().sum() == 0
    torch.testing.assert_close(w[..., :2].sum(-1), torch.ones(1, 1))


def test_load_balancing_loss_is_minimal_for_uniform_routing() -> None:
    """LB = E sum_i f_i P_i is 1 at uniform routing and larger for any other distribution
    shared by all tokens (top-k mass >= k/E), for top-1 and top-2; with k = E (a dense mixture)
    every expert is always selected and LB is the constant 1."""
    gen = torch.Generator().manual_seed(1)
    for experts, top_k in itertools.product([2, 4], [1, 2]):
        block = logit_block(experts, top_k)
        _, lb = block.routing(torch.zeros(3, 5, experts))
        assert float(lb.detach()) == pytest.approx(1.0)
        for _ in range(50):
            p = torch.randn(experts, generator=gen) * 2
            _, lb = block.routing(p.expand(3, 5, experts))
            if top_k < experts:
                assert float(lb.detach()) > 1.0 + 1e-6
            else:
                assert float(lb.detach()) == pytest.approx(1.0)


def test_sequence_router_is_causal() -> None:
    block = logit_block(3, 1, "sequence")
    g = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(2))
    later = g.clone()
    later[0, 4:] += 10.0  # change only the last two tokens
    w1, _ = block.routing(g)
    w2, _ = block.routing(later)
    torch.testing.assert_close(w1[0, :4], w2[0, :4])


def test_fresh_mixture_equals_the_base_model_and_trains_a_load_balancing_loss() -> None:
    base, moe = tiny_model(), tiny_model()
    inject_moe_lora_(moe, num_experts=3, r=2, alpha=4, top_k=2, seed=0)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=x).logits, base(input_ids=x).logits)
    assert len(moe_blocks(moe)) == 2  # one per layer's MLP
    moe(input_ids=x)
    assert load_balancing_loss(moe) is not None
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all(".moe_" in n for n in trainable)


def test_attention_experts_and_expert_masks() -> None:
    moe = tiny_model()
    inject_moe_lora_(moe, num_experts=2, r=2, alpha=4, modules="mlp+attention", seed=0)
    assert len(moe_blocks(moe)) == 4  # MLP and attention of each of the 2 layers
    with torch.no_grad():
        for n, p in moe.named_parameters():
            if ".moe_lora_B.1" in n:
                p.normal_()  # only expert 1 differs from the base
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    set_expert_count_(moe, 1)
    with torch.no_grad():
        only0 = moe(input_ids=x).logits
        torch.testing.assert_close(only0, tiny_model()(input_ids=x).logits)
        set_expert_count_(moe, None)
        assert not torch.allclose(moe(input_ids=x).logits, only0)


def test_comigs_uploads_only_generalists_and_keeps_specialists(tiny_cfg, tmp_path) -> None:
    """On the bytes: no specialist or router tensor ever leaves a client; the specialists do
    train (they change) and stay with the client; an exported client adapter reloads exactly."""
    from safetensors.torch import load as load_bytes

    from fedtune.adapters.moe_lora import load_moe_adapter
    from fedtune.client.run import ClientJob
    from fedtune.client.train import model_device
    from fedtune.engines.inprocess import inprocess_federation
    from fedtune.models.adapters import get_state
    from fedtune.models.export import export_adapters
    from fedtune.seeding import torch_generator

    cfg = tiny_cfg("adapter.kind=moe_lora", "strategy.name=comigs", "adapter.experts=[2, 2, 3, 3]", "train.steps=3")
    fed = inprocess_federation(cfg)
    init = get_state(fed.model)
    strategy, engine = fed.strategy, fed.engine
    codec = engine.plan.down_codec
    sstate = strategy.init_state(init)
    sent = strategy.configure(1, fed.client_ids, sstate)
    jobs = [ClientJob(1, c, codec.encode(sent[c], None, torch_generator(0, "d", c))[0]) for c in fed.client_ids]
    replies = engine.run(jobs)
    assert len(replies) == 4 and all(r.bytes_up == len(r.payload) for r in replies)
    for r in replies:
        keys = set(load_bytes(r.payload))
        assert keys and all(expert_index(k) == 0 for k in keys), sorted(keys)[:4]
        assert not any(is_router_key(k) for k in keys)
    for cid in fed.client_ids:
        private = engine.private_of(cid)
        assert {k for k in private if is_router_key(k)} and {k for k in private if expert_index(k) == 1}
        changed = [k for k in private if ".moe_lora_B.1" in k and not torch.equal(private[k], init[k])]
        assert changed, f"{cid}'s specialist did not train"
    # clients with 2 experts never touch expert 2
    assert all(torch.equal(engine.private_of("email")[k], init[k]) for k in init if ".moe_lora_B.2" in k)

    # the exported adapter of a 3-expert client reproduces the engine's model
    personal = strategy.configure(2, fed.client_ids, sstate)
    export_adapters(tmp_path, fed, None, personal, engine.private_of, engine.plan.variants)
    x = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    engine._load("logging", sstate["global"])
    with torch.no_grad():
        want = fed.model(input_ids=x.to(model_device(fed.model))).logits.cpu()  # the engine's model may be on a GPU
        got = load_moe_adapter(tiny_model(), tmp_path / "adapters" / "logging")(input_ids=x).logits
    torch.testing.assert_close(got, want)
