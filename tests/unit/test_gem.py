import pytest
import torch

from fedtune.config.inputs import ModelConfig
from fedtune.embedding.gem import (
    Layout,
    allowed_attention,
    embed_ids,
    gem_batch,
    gem_loss,
    init_tokens,
    input_embeds,
    split_points,
)


def test_attention_pattern_matches_a_hand_built_example():
    # prefix a b, specials S1 S2, suffix c d, one padding position
    got = allowed_attention(Layout(prefix=2, special=2, suffix=2, pad=1)).int()
    #                   a  b  S1 S2 c  d  pad
    expected = [
        [1, 0, 0, 0, 0, 0, 0],  # a: causal
        [1, 1, 0, 0, 0, 0, 0],  # b
        [1, 1, 1, 0, 0, 0, 0],  # S1 sees the prefix and itself
        [1, 1, 0, 1, 0, 0, 0],  # S2 sees the prefix and itself, not S1
        [0, 0, 1, 1, 1, 0, 0],  # c sees the specials and itself, not the prefix
        [0, 0, 1, 1, 1, 1, 0],  # d
        [0, 0, 0, 0, 0, 0, 1],  # padding: only itself
    ]
    assert got.tolist() == expected


def test_token_placement_and_targets():
    b = gem_batch([[11, 12], [21]], [[13], [22, 23, 24]], k=2)
    # row 0: 11 12 S S 13 pad ; row 1: 21 S S 22 23 24
    assert b.ids.tolist() == [[11, 12, 0, 0, 13, 0], [21, 0, 0, 22, 23, 24]]
    assert b.special.tolist() == [[-1, -1, 0, 1, -1, -1], [-1, 0, 1, -1, -1, -1]]
    # the last special token predicts the first suffix token; the prefix predicts nothing
    assert b.labels.tolist() == [[-100, -100, -100, 13, -100, -100], [-100, -100, 22, 23, 24, -100]]
    assert b.allowed[0, 5].tolist() == [False] * 5 + [True]  # the padding row sees only itself
    assert b.allowed[1, 3, 0].item() is False  # suffix token 22 does not see prefix token 21
    assert b.allowed[1, 3, 1].item() is True  # it sees the special tokens


def test_split_points_are_inside_the_text_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cuts = split_points([2, 5, 9] * 20, g1)
    assert cuts == split_points([2, 5, 9] * 20, g2)
    assert all(1 <= c <= n - 1 for c, n in zip(cuts, [2, 5, 9] * 20))


@pytest.fixture(scope="module")
def tiny():
    from fedtune.models.load import load_model, tiny_dir

    cfg = ModelConfig(name="tiny", dtype="float32")
    return load_model(str(tiny_dir(cfg, 0)), cfg)


def test_special_vectors_are_placed_in_the_input(tiny):
    tokens = torch.randn(2, tiny.config.hidden_size)
    b = gem_batch([[5, 6]], [[7]], k=2)
    emb = input_embeds(tiny, b.ids, b.special, tokens)
    assert torch.equal(emb[0, 2], tokens[0]) and torch.equal(emb[0, 3], tokens[1])
    assert torch.equal(emb[0, 0], tiny.get_input_embeddings().weight[5])


def test_prefix_reaches_the_suffix_only_through_the_special_tokens(tiny):
    # changing the prefix changes the suffix's logits only via the special tokens: with the
    # special tokens' outputs fixed by an unchanged prefix, the suffix cannot see the prefix
    tokens = init_tokens(tiny, 1, torch.Generator().manual_seed(0))
    from fedtune.embedding.gem import _forward

    a = _forward(tiny, gem_batch([[5, 6, 7]], [[8, 9]], 1), tokens, False).logits
    b = _forward(tiny, gem_batch([[40, 41, 42]], [[8, 9]], 1), tokens, False).logits
    assert not torch.allclose(a[0, 3:], b[0, 3:])  # through the special token, the prefix matters
    # with the suffix's view of the prefix cut, a plain causal pass differs from the GEM pass
    ids = torch.tensor([[5, 6, 7, 0, 8, 9]])
    emb = input_embeds(tiny, ids, torch.tensor([[-1, -1, -1, 0, -1, -1]]), tokens)
    plain = tiny(inputs_embeds=emb).logits
    assert torch.allclose(plain[0, :4], a[0, :4], atol=1e-5)  # prefix and special token: causal as usual
    assert not torch.allclose(plain[0, 4:], a[0, 4:], atol=1e-4)


def test_embedding_with_one_token_is_the_last_hidden_state_of_a_causal_pass(tiny):
    tokens = init_tokens(tiny, 1, torch.Generator().manual_seed(1))
    texts = [[5, 6, 7, 8], [9, 10]]
    got = embed_ids(tiny, texts, tokens, batch_size=2)  # padded batch
    for i, t in enumerate(texts):
        emb = torch.cat([tiny.get_input_embeddings()(torch.tensor([t]))[0], tokens], 0)[None]
        ref = tiny(inputs_embeds=emb, output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(got[i], ref, atol=1e-5)


def test_gem_loss_trains_the_special_tokens(tiny):
    tokens = init_tokens(tiny, 2, torch.Generator().manual_seed(0)).requires_grad_(True)
    loss = gem_loss(tiny, [[5, 6, 7, 8, 9], [10, 11, 12]], tokens, torch.Generator().manual_seed(0), 0.0)
    loss.backward()
    assert torch.isfinite(loss) and tokens.grad is not None and tokens.grad.abs().sum() > 0
