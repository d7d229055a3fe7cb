"""dimat: a neighbour's LoRA rank components aligned to the receiver's (permutation + paired sign
flips by linear assignment) keep its products exactly, and a permuted copy merges back to the
receiver's own adapter, where plain gossip would average unrelated components."""

import torch

from fedtune.client.run import PeerState
from fedtune.strategies.base import RunContext
from fedtune.strategies.decentralized import mixing_error
from fedtune.strategies.dimat import DIMAT, align_components
from fedtune.strategies.lora_math import products

M = "layers.0.q_proj"


def lora(seed: int, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {M + ".lora_A.weight": torch.randn(r, 6, generator=g), M + ".lora_B.weight": torch.randn(5, r, generator=g)}


def scrambled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same adapter (same B A) with its components permuted and two pairs sign-flipped."""
    perm, sign = torch.tensor([2, 0, 3, 1]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    a, b = state[M + ".lora_A.weight"], state[M + ".lora_B.weight"]
    return {M + ".lora_A.weight": a[perm] * sign[:, None], M + ".lora_B.weight": b[:, perm] * sign[None, :]}


def test_a_scrambled_copy_is_aligned_back_exactly() -> None:
    own = lora(0)
    other = scrambled(own)
    assert torch.allclose(products(other)[M], products(own)[M], atol=1e-6)  # the same adapter
    assert not torch.allclose(other[M + ".lora_A.weight"], own[M + ".lora_A.weight"])
    aligned = align_components(own, other)
    for k in own:
        assert torch.allclose(aligned[k], own[k], atol=1e-6)


def test_alignment_keeps_the_neighbours_product_and_lowers_the_mixing_error() -> None:
    own = lora(0)
    noisy = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in own.items()}
    other = scrambled(noisy)
    aligned = align_components(own, other)
    assert torch.allclose(products(aligned)[M], products(other)[M], atol=1e-5)
    plain = mixing_error([own, other], [0.5, 0.5])
    matched = mixing_error([own, aligned], [0.5, 0.5])
    assert matched < 0.05 < 0.5 < plain  # unrelated components averaged: a large error; aligned: noise only


def test_dimat_mix_of_a_scrambled_twin_returns_the_peers_model() -> None:
    own = lora(3)
    strategy = DIMAT(topology="complete", ctx=RunContext(seed=0, client_ids=("a", "b")))
    mixed, error = strategy.mix("a", PeerState(own), {"b": scrambled(own)}, {"a": 0.5, "b": 0.5})
    for k in own:
        assert torch.allclose(mixed.x[k], own[k], atol=1e-6)
    assert error < 1e-6
