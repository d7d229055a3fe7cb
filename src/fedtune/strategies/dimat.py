"""DIMAT-style decentralized iterative merge-and-train for LoRA (after Saadati et al., "DIMAT:
Decentralized Iterative Merging-And-Training for Deep Learning Models", CVPR 2024,
arXiv:2404.08079).

DIMAT's agents train locally, then merge with their neighbours through a model-merging operator
that first aligns the neighbours' units to the agent's own (a permutation per layer, found as a
linear assignment problem) and then mixes with the mixing matrix's weights. fedtune applies that
to the symmetry a LoRA adapter actually has: its rank components. For a module, B A =
sum_k b_k a_k^T is unchanged by permuting the components k and by flipping the sign of a pair
(b_k, a_k), but averaging A and B separately is not: the k-th row of one peer's A need not
describe the same direction as the k-th row of another's, and averaging them mixes unrelated
components (the factor-mixing error `agg_error` of `gossip`). Before mixing, a receiver aligns
each neighbour's components to its own:

    S_kl = (b_k . b'_l) (a_k . a'_l) = <b_k a_k^T, b'_l a'_l^T>_F        (per module)
    pi = argmax_pi sum_k S_k,pi(k)   (scipy's linear_sum_assignment, exact)
    a'_pi(k) -> slot k, b'_pi(k) -> slot k, both negated where a_k . a'_pi(k) < 0

which minimises sum_k ||b_k a_k^T - b'_pi(k) a'_pi(k)^T||_F^2 over permutations (the norms
do not depend on pi) and keeps every neighbour's product B' A' exactly. Then it mixes as gossip
does (topology, weights, push-sum: every `gossip` option).

The paper matches *activations* (units' cross-correlation on the agent's data). Here the matching
uses the weights (Git Re-Basin's weight matching, Ainsworth et al., arXiv:2209.04836): it needs no
data pass over the neighbours' adapters, and for LoRA the rank-one components are the units. An
activation-matched variant would run each neighbour's A on the receiver's inputs; not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedtune.adapters.base import Algebra
from fedtune.client.run import PeerState
from fedtune.strategies.base import STRATEGIES, Capabilities
from fedtune.strategies.decentralized import Gossip, mix_inbox
from fedtune.strategies.lora_math import A_SUFFIX, B_SUFFIX, lora_modules
from fedtune.types import AdapterState


def align_components(ref: AdapterState, other: AdapterState) -> AdapterState:
    """`other` with each LoRA module's rank components permuted (and sign-flipped in pairs) to
    match `ref`'s (module docstring); every product B A and every other tensor unchanged."""
    from scipy.optimize import linear_sum_assignment

    out = dict(other)
    for m in lora_modules(ref):
        a, b = ref[m + A_SUFFIX].double(), ref[m + B_SUFFIX].double()
        a2, b2 = other[m + A_SUFFIX].double(), other[m + B_SUFFIX].double()
        score = (b.T @ b2) * (a @ a2.T)  # [r, r]: <b_k a_k^T, b'_l a'_l^T>
        rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
        perm = torch.as_tensor(cols[rows.argsort()])
        a2, b2 = a2[perm], b2[:, perm]
        sign = torch.where((a * a2).sum(dim=1) < 0, -1.0, 1.0).to(torch.float64)
        out[m + A_SUFFIX] = (a2 * sign[:, None]).to(other[m + A_SUFFIX].dtype)
        out[m + B_SUFFIX] = (b2 * sign[None, :]).to(other[m + B_SUFFIX].dtype)
    return out


@STRATEGIES.register("dimat")
@dataclass(frozen=True)
class DIMAT(Gossip):
    """DIMAT-style merge-and-train (arXiv:2404.08079; weight matching of LoRA's rank components,
    module docstring): each receiver aligns its neighbours' adapters to its own, then mixes them
    as `gossip` does (every gossip option). Same round metrics as gossip; `agg_error` is the
    factor-mixing error after alignment."""

    capabilities = Capabilities(
        has_global=False,
        personalized=True,
        transmits=False,
        peer_to_peer=True,
        algebras=frozenset({Algebra.LORA_PRODUCT}),
    )

    def mix(
        self,
        me: str,
        own: PeerState,
        inbox: Mapping[str, AdapterState],
        coef: Mapping[str, float],
        losses: Mapping[str, float] | None = None,
    ) -> tuple[PeerState, float]:
        mine = self.message(own)
        aligned = {j: align_components(mine, msg) for j, msg in inbox.items()}
        return mix_inbox(own, mine, aligned, coef, me)
