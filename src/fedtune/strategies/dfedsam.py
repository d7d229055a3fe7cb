"""DFedSAM (Shi, Shen, Wei, Sun, Yuan, Wang and Tao, "Improving the Model Consistency of
Decentralized Federated Learning", ICML 2023, arXiv:2302.04083): decentralized FedAvg whose local
steps are sharpness-aware. Each round every peer i takes K local SAM steps from its own model,

    g = grad F_i(y; xi),   y <- y - eta * grad F_i(y + rho g / ||g||; xi)      (same mini-batch xi)

(`client.sam`, selected by `train.sam_rho` = rho; the optimizer is fedtune's, SGD as in the paper
with `train.optimizer: sgd`), then mixes with its neighbours, x_i <- sum_j W_ij y_j, over the
gossip topology and weights of `gossip` (`strategies.decentralized`). The paper's DFedSAM-MGS
(Q gossip steps per round, i.e. W^Q) is not offered: Q exchanges with the neighbours would be Q
messages per edge, which the serverless loop sends once a round.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.strategies.base import STRATEGIES, Capabilities
from fedtune.strategies.decentralized import Gossip


@STRATEGIES.register("dfedsam")
@dataclass(frozen=True)
class DFedSAM(Gossip):
    """DFedSAM (arXiv:2302.04083): gossip (every `gossip` option: topology, mixing, push-sum)
    after sharpness-aware local steps; needs `train.sam_rho` > 0 (the paper tunes rho in
    {0.01, ..., 0.1}). Same round metrics as gossip."""

    capabilities = Capabilities(
        has_global=False, personalized=True, transmits=False, peer_to_peer=True, sharpness_aware=True
    )
