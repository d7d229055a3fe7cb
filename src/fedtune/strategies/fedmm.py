"""FedMM (Shen et al., arXiv:2110.08477; AAMAS 2023): federated adversarial domain adaptation as a
distributed minimax problem, solved with per-client dual variables (an augmented Lagrangian)
instead of plain gradient descent-ascent averaging.

Parties: labelled ones (the source domain; label-skewed, e.g. one or two topics each) train the
adapter on their answers; unlabelled ones (the shifted target domain) contribute only their text.
A domain discriminator on the model's mean-pooled hidden states plays against the adapter
(`fedmm_client`); the server holds and averages the adapter and the discriminator.

`method`:
- 'fedmm': the paper's update (`minimax`): local steps on F_i + lam_i + mu (v - v_bar), dual
  ascent lam_i += mu (v_i - v_bar) on the client, the client sends v_i + lam_i / mu_t, the server
  averages uniformly (the authors' code). The duals stay in each client's ClientState.
- 'gda': FedAvg-GDA, the baseline the paper beats: the same local minimax steps without
  corrections, averaged.
- 'source_only': ignore the unlabelled parties (they train nothing and are left out of the
  average); the labelled ones do plain LM steps (no discriminator): FedAvg over the labelled
  parties, with the same data, steps and weights as the other two methods.

The fixed-point argument (exact saddle of the sum for any number of local steps, under full
participation) is in `minimax`; a round where some parties do not reply averages those that do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune.data.blocks import Shard
from fedtune.errors import Problem
from fedtune.models.adapters import trainable_keys
from fedtune.strategies.base import STRATEGIES, Aggregate, Capabilities, PeerScoring, StrategyBase, sorted_updates
from fedtune.strategies.fedmm_client import adversarial_round, init_discriminator
from fedtune.strategies.minimax import consensus, message_mu
from fedtune.strategies.params import Count, NonNegative, Positive
from fedtune.types import AdapterState, ClientUpdate


@STRATEGIES.register("fedmm")
@dataclass(frozen=True)
class FedMM(StrategyBase):
    """FedMM (arXiv:2110.08477) for adapters, with FedAvg-GDA and source-only FedAvg as `method`s
    of the same minimax (see the module docstring).

    Attributes:
        method: 'fedmm', 'gda' or 'source_only'.
        unlabelled: ids of the parties without labels (the target domain).
        mu: the augmented-Lagrangian penalty (the authors' lambda1; their runs use 2).
        growth: the message divisor mu_t = mu * growth ** (round / 100) (the authors' lambda1_decay).
        adv_weight: weight of the domain loss in the adapter's objective (their coef: 1 for the toy
            network, 0.25 for pre-trained ones).
        disc_width: the discriminator's hidden width.
        disc_lr: the discriminator's learning rate (default: train.lr).
    """

    method: Literal["fedmm", "gda", "source_only"] = "fedmm"
    unlabelled: tuple[str, ...] = ("target",)
    mu: NonNegative = 1.0
    growth: float = 1.0
    adv_weight: NonNegative = 0.1
    disc_width: Count = 64
    disc_lr: Positive | None = None

    capabilities = Capabilities(client_private=True, client_step=True, strategy_private=True)

    def init_state(self, global_state: AdapterState) -> dict[str, Any]:
        if self.ctx.hidden_size <= 0:
            raise ValueError("FedMM needs the model's hidden width (RunContext.hidden_size) to build its discriminator")
        return {
            "global": global_state,
            "disc": init_discriminator(self.ctx.hidden_size, self.disc_width, self.ctx.seed),
        }

    def configure(self, rnd: int, client_ids: Sequence[str], state: dict[str, Any]) -> Mapping[str, AdapterState]:
        # source_only: plain FedAvg over the labelled parties, nothing of the discriminator travels
        msg = state["global"] if self.method == "source_only" else {**state["global"], **state["disc"]}
        return {cid: msg for cid in client_ids}

    def aggregate(
        self, rnd: int, updates: Sequence[ClientUpdate], state: dict[str, Any], peers: PeerScoring | None = None
    ) -> Aggregate:
        ups = [u for u in sorted_updates(updates) if self.method != "source_only" or u.client_id not in self.unlabelled]
        if not ups:
            return Aggregate(state["global"], state)
        w = [1.0 / len(ups)] * len(ups)  # uniform, as in the authors' code
        mean = consensus([{k: u.delta[k].double() for k in sorted(u.delta)} for u in ups], w)
        new = {k: v + mean[k].to(v.dtype) if k in mean else v for k, v in state["global"].items()}
        disc = {k: v + mean[k].to(v.dtype) if k in mean else v for k, v in state["disc"].items()}
        labelled = [u for u in ups if u.client_id not in self.unlabelled]
        metrics: dict[str, Any] = {
            "parties_labelled": len(labelled),
            "parties_unlabelled": len(ups) - len(labelled),
        }
        if all("domain_acc" in u.metrics for u in ups):  # the discriminator's accuracy while training
            metrics["domain_acc"] = sum(u.metrics["domain_acc"] for u in ups) / len(ups)
        return Aggregate(new, {**state, "global": new, "disc": disc}, metrics)

    def client_train(
        self,
        model: Any,
        received: AdapterState,
        private: AdapterState,
        shard: Shard,
        spec: Any,
        seed: int,
        rnd: int,
        on_step: Callable[[int, int, float], None] | None = None,
        adapter: Any = None,
    ) -> tuple[AdapterState, dict[str, float], AdapterState]:
        """The party's local round (`fedmm_client.adversarial_round`); 'source_only': labelled
        parties take plain LM steps (adv_weight 0, discriminator unchanged), unlabelled ones nothing."""
        labelled = shard.client_id not in self.unlabelled
        if self.method == "source_only":
            if not labelled:
                return {k: torch.zeros_like(received[k]) for k in trainable_keys(received)}, {"steps": 0.0}, private
            delta, metrics, _ = adversarial_round(
                model, received, {}, shard, spec, seed, rnd, on_step, labelled=True, method="gda",
                mu=0.0, mu_t=1.0, adv_weight=0.0, disc_lr=0.0,
            )  # fmt: skip
            return delta, metrics, private
        return adversarial_round(
            model, received, private, shard, spec, seed, rnd, on_step, labelled=labelled, method=self.method,
            mu=self.mu, mu_t=message_mu(self.mu, self.growth, rnd), adv_weight=self.adv_weight, disc_lr=self.disc_lr,
        )  # fmt: skip

    def network_problems(self, client_ids: Sequence[str], seed: int) -> list[Any]:
        missing = sorted(set(self.unlabelled) - set(client_ids))
        out = []
        if missing:
            out.append(
                Problem(
                    "strategy.unlabelled",
                    list(self.unlabelled),
                    f"no client {', '.join(missing)} (clients: {', '.join(client_ids)})",
                    "name the unlabelled parties by client id (data.shift makes one called 'target')",
                )
            )
        if not set(client_ids) - set(self.unlabelled):
            out.append(
                Problem(
                    "strategy.unlabelled",
                    list(self.unlabelled),
                    "every client is unlabelled: nobody trains the task",
                    "leave at least one labelled party out of strategy.unlabelled",
                )
            )
        return out

    @classmethod
    def config_problems(cls, params: dict[str, Any], adapter: Any, codec: Any, secure: bool) -> list[Problem]:
        out = []
        if float(params.get("mu", 1.0)) <= 0 and params.get("method", "fedmm") == "fedmm":
            out.append(
                Problem("strategy.mu", params.get("mu"), "FedMM divides by mu (the message v + lam / mu)", "use mu > 0")
            )
        return out
