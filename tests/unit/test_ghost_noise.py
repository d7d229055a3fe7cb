import pytest
import torch

from fedtune.client.ghost_noise import ghost_noise, ghost_noise_injected


def test_ghost_noise_matches_its_formula_and_the_paper_variance():
    torch.manual_seed(0)
    x = torch.randn(256, 4) * 3.0 + 1.0
    out = ghost_noise(x, 16, torch.Generator().manual_seed(0))
    idx = torch.randint(256, (256, 16), generator=torch.Generator().manual_seed(0))
    mean, var = x.mean(0), x.var(0, correction=0)
    g_mean, g_var = x[idx].mean(1), x[idx].var(1, correction=0)
    expected = (x - (g_mean - mean)) / torch.sqrt((g_var + 1e-3) / (var + 1e-3))
    assert torch.allclose(out, expected, atol=1e-5)
    shift = g_mean - mean  # zero mean, variance var / N
    assert shift.mean(0).abs().max() < 4 * (var / 16 / 256).sqrt().max()
    assert torch.allclose(shift.var(0), var / 16, rtol=0.25)


def test_seeded():
    x = torch.randn(32, 5)
    a = ghost_noise(x, 4, torch.Generator().manual_seed(7))
    b = ghost_noise(x, 4, torch.Generator().manual_seed(7))
    c = ghost_noise(x, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def tiny():
    from fedtune.config.inputs import ModelConfig
    from fedtune.models.load import load_model, tiny_dir

    cfg = ModelConfig(name="tiny", dtype="float32")
    return load_model(str(tiny_dir(cfg, 0)), cfg)


def test_noise_in_training_off_at_evaluation_and_hooks_removed(tiny):
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    tiny.eval()
    clean = tiny(input_ids=ids).logits
    with ghost_noise_injected(tiny, 4, torch.Generator().manual_seed(0)) as n:
        assert n == 2 * tiny.config.num_hidden_layers + 1  # two RMSNorms per layer and the final norm
        tiny.eval()
        assert torch.equal(tiny(input_ids=ids).logits, clean)  # eval mode: no noise
        tiny.train()
        noisy = tiny(input_ids=ids).logits
        assert not torch.allclose(noisy, clean)
    tiny.train()
    assert torch.equal(tiny(input_ids=ids).logits, clean)  # hooks gone
    tiny.eval()


def test_client_round_with_ghost_noise_is_seeded_and_differs_from_without(tiny_with_lora, random_shard):
    from dataclasses import replace

    from fedtune.client.round import client_round
    from fedtune.client.train import TrainSpec

    model, init = tiny_with_lora()
    shard = random_shard("a")
    spec = TrainSpec(steps=2, batch_size=4, lr=0.01)
    ghost = replace(spec, ghost_batch=4)
    d_off, _, _ = client_round(model, init, shard, spec, seed=0, rnd=1)
    d_on, _, _ = client_round(model, init, shard, ghost, seed=0, rnd=1)
    d_again, _, _ = client_round(model, init, shard, ghost, seed=0, rnd=1)
    assert all(torch.equal(d_on[k], d_again[k]) for k in d_on)
    assert any(not torch.allclose(d_on[k], d_off[k]) for k in d_on)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_the_configured_eps_reaches_the_injected_noise(tiny_with_lora, random_shard, monkeypatch):
    """`train.ghost_noise.eps` is the eps of every injected transform (it was dropped: the hooks
    always used the default 1e-3)."""
    from dataclasses import replace

    from fedtune.client import ghost_noise as gn
    from fedtune.client.round import client_round
    from fedtune.client.train import TrainSpec

    seen = set()
    real = gn.ghost_noise

    def spy(x, n, gen, eps=1e-3):
        seen.add(eps)
        return real(x, n, gen, eps)

    monkeypatch.setattr(gn, "ghost_noise", spy)
    model, init = tiny_with_lora()
    spec = replace(TrainSpec(steps=1, batch_size=4, lr=0.01), ghost_batch=4, ghost_eps=0.25)
    client_round(model, init, random_shard("a"), spec, seed=0, rnd=1)
    assert seen == {0.25}


def test_last_injects_at_the_final_norm_only(tiny):
    """`train.ghost_noise.last: 1`: one hook, on the model's final norm (the last in module order);
    the hidden states before it are the clean model's, the logits are not."""
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    tiny.eval()
    clean = tiny(input_ids=ids, output_hidden_states=True)
    final_norm = tiny.model.norm
    with ghost_noise_injected(tiny, 4, torch.Generator().manual_seed(0), last=1) as n:
        assert n == 1 and len(final_norm._forward_hooks) == 1
        tiny.train()
        noisy = tiny(input_ids=ids, output_hidden_states=True)
        tiny.eval()
    # every decoder layer's output is untouched (the last hidden state is the final norm's output)
    for a, b in zip(clean.hidden_states[:-1], noisy.hidden_states[:-1]):
        assert torch.equal(a, b)
    assert not torch.allclose(noisy.logits, clean.logits)
    assert not final_norm._forward_hooks
