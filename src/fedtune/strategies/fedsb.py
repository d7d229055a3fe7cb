"""Fed-SB (Singhal et al., arXiv:2502.15436): federated LoRA-SB, only R travels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedtune.adapters.base import Algebra
from fedtune.adapters.lora_sb import SB_R
from fedtune.strategies.base import STRATEGIES, Capabilities, Combined, GlobalModel
from fedtune.strategies.fedavg import fedavg_aggregate
from fedtune.types import AdapterState, ClientUpdate


@STRATEGIES.register("fedsb")
@dataclass(frozen=True)
class FedSB(GlobalModel):
    """Fed-SB (arXiv:2502.15436): LoRA-SB adapters dW = B R A with B, A frozen and shared; only the
    r x r R is trained, sent and averaged, so B R_bar A = sum_k p_k B R_k A exactly, and the bytes
    (4 r^2 per module in fp32) do not depend on the layer width. Needs adapter.kind: lora_sb."""

    capabilities = Capabilities(sum_only=True, algebras=frozenset({Algebra.LORA_SB}))  # a weighted sum of R

    def send(self, state: dict[str, Any], client_id: str) -> AdapterState:
        return {k: v for k, v in state["global"].items() if k.endswith(SB_R)}

    def combine(self, rnd: int, updates: list[ClientUpdate], state: dict[str, Any]) -> Combined:
        return fedavg_aggregate(state["global"], updates), {}, {}
