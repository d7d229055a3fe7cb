"""Sample-level DP-SGD: without noise and clipping it is the plain SGD step; each example's
contribution is clipped to C; the noise has standard deviation sigma * C on the summed gradient."""

import math

import pytest
import torch

from fedtune.client.train import TrainData, TrainSpec, local_train_
from fedtune.models.adapters import adapter_parameters, get_state, select_trainable_, trainable_keys


def setup(tiny_with_lora, n: int = 6):
    model, init = tiny_with_lora()
    keys = sorted(trainable_keys(init))
    select_trainable_(model, keys)
    by_key = adapter_parameters(model)
    params = [by_key[k] for k in keys]
    with torch.no_grad():  # non-zero B, so A gets gradients too
        for k in keys:
            if "lora_B" in k:
                by_key[k].copy_(0.05 * torch.randn(by_key[k].shape, generator=torch.Generator().manual_seed(1)))
    blocks = torch.randint(0, 200, (n, 16), generator=torch.Generator().manual_seed(2))
    return model, params, blocks, {k: v.clone() for k, v in get_state(model).items() if k in keys}


def change(model, before):
    after = get_state(model)
    return torch.cat([(after[k] - v).flatten() for k, v in before.items()])


def test_without_noise_or_binding_clip_dp_sgd_is_the_plain_sgd_step(tiny_with_lora) -> None:
    base = dict(steps=1, batch_size=6, lr=0.1, optimizer="sgd", max_grad_norm=None)
    model, params, blocks, before = setup(tiny_with_lora)
    local_train_(model, params, TrainData(blocks), TrainSpec(**base), torch.Generator().manual_seed(0))
    plain = change(model, before)
    model, params, blocks, before = setup(tiny_with_lora)
    stats = local_train_(
        model, params, TrainData(blocks), TrainSpec(**base, dp_clip=1e6, dp_noise=0.0), torch.Generator().manual_seed(0)
    )
    dp = change(model, before)  # q = 6/6 = 1: every block is in the batch
    assert stats["dp_rate"] == 1.0 and stats["dp_steps"] == 1.0
    assert float(plain.norm()) > 0
    torch.testing.assert_close(dp, plain, atol=1e-6, rtol=1e-4)


def test_each_example_is_clipped_to_c(tiny_with_lora) -> None:
    clip, lr = 1e-3, 1.0
    for n in (1, 6):
        model, params, blocks, before = setup(tiny_with_lora, n)
        spec = TrainSpec(steps=1, batch_size=n, lr=lr, optimizer="sgd", max_grad_norm=None, dp_clip=clip, dp_noise=0.0)
        local_train_(model, params, TrainData(blocks), spec, torch.Generator().manual_seed(0))
        step = float(change(model, before).norm())  # lr * (sum of n clipped gradients) / n
        if n == 1:  # one example, gradient norm far above C: the step is exactly lr * C
            assert step == pytest.approx(lr * clip, rel=1e-4)
        else:
            assert step <= lr * clip * (1 + 1e-5)


def test_noise_standard_deviation_is_sigma_times_c(tiny_with_lora) -> None:
    clip, sigma, lr, n = 1e-7, 2.0, 1.0, 4
    model, params, blocks, before = setup(tiny_with_lora, n)
    spec = TrainSpec(steps=1, batch_size=n, lr=lr, optimizer="sgd", max_grad_norm=None, dp_clip=clip, dp_noise=sigma)
    local_train_(model, params, TrainData(blocks), spec, torch.Generator().manual_seed(0))
    noise = change(model, before) * n / lr  # = -(clipped sum + noise); the clipped sum is <= n * C
    assert noise.numel() == 896  # rank-2 LoRA on q, v of 2 layers: sample std within ~2.4 % (one s.e.)
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.08)
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(896)


def test_poisson_batches_have_the_expected_size(tiny_with_lora) -> None:
    """q = batch_size / N; over many steps the mean batch is q N (here 2 of 8 blocks)."""
    import fedtune.client.train as train

    sizes = []
    real = train.lm_loss

    def count(model, batch, *a):
        sizes.append(int(batch.shape[0]))
        return real(model, batch, *a)

    model, params, blocks, _ = setup(tiny_with_lora, 8)
    spec = TrainSpec(steps=60, batch_size=2, lr=1e-4, optimizer="sgd", dp_clip=1.0, dp_noise=0.5)
    try:
        train.lm_loss = count
        stats = local_train_(model, params, TrainData(blocks), spec, torch.Generator().manual_seed(0))
    finally:
        train.lm_loss = real
    assert set(sizes) == {1}  # one backward per example
    assert stats["dp_rate"] == 0.25
    assert abs(len(sizes) / 60 - 2.0) < 3 * math.sqrt(8 * 0.25 * 0.75 / 60)  # within 3 standard errors


def test_dp_sgd_noise_stays_in_a_low_rank_clients_own_rows(tiny_with_lora, random_shard) -> None:
    """A rank-1 client inside the rank-2 LoRA (FLoRA / FlexLoRA / HetLoRA ranks): the padded row
    of A and column of B get zero gradients, and DP-SGD's noise must not land there either (the
    landed code noised them, so the client trained a larger adapter than it sent)."""
    from fedtune.client.round import client_round
    from fedtune.strategies.merge import truncate_rank

    model, init = tiny_with_lora()
    received = truncate_rank({k: v.clone() for k, v in init.items()}, 1)
    spec = TrainSpec(steps=3, batch_size=4, lr=0.05, dp_clip=1.0, dp_noise=1.0)
    delta, _, _ = client_round(model, received, random_shard("c1"), spec, 0, 1)
    after = get_state(model)
    for k, v in received.items():
        assert delta[k].shape == v.shape
        full = after[k]
        if "lora_A" in k:
            assert torch.count_nonzero(full[1:]) == 0, k  # the padded row of A
        else:
            assert torch.count_nonzero(full[:, 1:]) == 0, k  # the padded column of B
    assert any(float(d.abs().max()) > 0 for d in delta.values())  # the own rank did train


def test_unit_document_packs_each_document_alone_and_clips_all_its_blocks_together(tiny_with_lora) -> None:
    """train.dp_sgd.unit: document. No block mixes two documents (pads masked out of the loss);
    one Poisson draw per document, and the document's whole gradient (all its blocks) is clipped
    to C as one example: a 3-block document moves the adapter by exactly lr * C in one SGD step."""
    from fedtune.config.schema import ModelConfig
    from fedtune.data.blocks import pack_documents
    from fedtune.models.load import load_tokenizer, tiny_dir

    tok = load_tokenizer(str(tiny_dir(ModelConfig(name="tiny"), 0)))
    texts = ["a" * 40, "bb" * 5]  # 40 + 1 tokens (3 blocks of 16), 10 + 1 tokens (1 padded block)
    blocks, docs, mask, n = pack_documents(texts, tok, 16)
    assert docs.tolist() == [0, 0, 0, 1] and n == 52
    assert mask.sum(1).tolist() == [16, 16, 9, 11] and not mask[2, 9:].any()

    model, params, _, before = setup(tiny_with_lora)
    clip, lr = 1e-4, 0.5
    spec = TrainSpec(steps=1, batch_size=2, lr=lr, optimizer="sgd", max_grad_norm=None, dp_clip=clip, dp_noise=0.0)
    stats = local_train_(
        model, params, TrainData(blocks[:3], mask[:3], docs[:3]), spec, torch.Generator().manual_seed(0)
    )  # one document: q = min(1, 2 / 1) = 1, it is always drawn
    assert stats["dp_rate"] == 1.0
    assert float(change(model, before).norm()) == pytest.approx(lr * clip, rel=1e-4)
