"""The adapter contract: what an adapter kind declares and does, and the registry of kinds.

An adapter kind is one file in `adapters/` with one class registered in `ADAPTERS` by the name
that `adapter.kind` selects. The class is a frozen dataclass holding its own options (its model
in `config.schema`); it injects itself into a base model, says which tensors travel and loads
them, names its parameter groups, adds its auxiliary loss, exports itself, and declares its
update's algebra as data (`Algebra`), which strategies match at validate time.

Operations on an injected model (state, load, parameters, scale) depend only on the model, so
`adapter_of(model)` serves them from the kind recorded at injection; operations that depend on
the options (groups, auxiliary loss, export, config problems) use the instance `build_adapter`
makes from the config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from fedtune.errors import Problem
from fedtune.registry import Registry
from fedtune.types import AdapterState

KIND_MARK = "_fedtune_adapter"  # the kind an injection recorded on the model (its registered name)
DEFAULT_KIND = "lora"


class Algebra(StrEnum):
    """What a client's update is, as exact-aggregation strategies need to know it."""

    LORA_PRODUCT = "lora_product"  # dW = s * B @ A per module; keys <m>.lora_A.weight [r, k], <m>.lora_B.weight [d, r]
    LORA_SB = "lora_sb"  # dW = B @ R @ A; A, B frozen and shared, only <m>.lora_sb_R [r, r] travels
    MIXTURE = "mixture"  # routed mixture of per-expert LoRA products (keys per expert and router)
    DENSE = "dense"  # a dense offset per weight
    OTHER = "other"  # anything else (prompt embeddings, scaling vectors, ...)
    DORA = "dora"  # m * (W + s * B @ A) / ||W + s * B @ A||_row: LoRA keys plus <m>.lora_magnitude_vector [d]
    VERA = "vera"  # diag(b) @ B @ diag(d) @ A; A, B frozen, shared and seeded, never travel; b, d travel
    PROMPT = "prompt"  # virtual-token embeddings put before the input (key prompt_embeddings [n, d])


ALGEBRA_TEXT = {
    Algebra.LORA_PRODUCT: "s * B @ A (keys lora_A, lora_B)",
    Algebra.LORA_SB: "B @ R @ A with A, B shared (only R travels)",
    Algebra.MIXTURE: "a routed mixture of LoRA experts",
    Algebra.DENSE: "a dense weight offset",
    Algebra.OTHER: "not a product of LoRA factors",
    Algebra.DORA: "m * (W + s * B @ A) / ||W + s * B @ A|| (DoRA's magnitude vector m rescales each row)",
    Algebra.VERA: "diag(b) @ B @ diag(d) @ A with A, B frozen shared random matrices (only b, d travel)",
    Algebra.PROMPT: "virtual-token embeddings before the input (no weight offset)",
}
ANY_ALGEBRA: frozenset[Algebra] = frozenset(Algebra)


@dataclass(frozen=True)
class ParamGroup:
    """Adapter tensors trained together.

    Attributes:
        name: e.g. 'adapter', 'experts', 'router'.
        keys: state keys of the group, sorted.
        lr: learning rate of the group's own optimizer (None: train.lr); used when `every` > 0.
        every: 0 = trained jointly with the other groups; n > 0 = after every n-th step of the
            joint groups, `steps` steps of this group alone on the validation split (CoMiGS's
            alternating router schedule): plain steps, so DP-SGD refuses a group with every > 0
            (`components.check_strategy`, from `param_groups(())`: the schedule is declared by the
            options, not by the keys). Its options are `adapter.<name>_every` / `_steps` / `_lr`.
        steps: steps each time (with `every` > 0).
    """

    name: str
    keys: tuple[str, ...]
    lr: float | None = None
    every: int = 0
    steps: int = 1


@dataclass(frozen=True)
class InjectContext:
    """Run facts an injection may need: the seed of its random init, the base's architecture,
    the largest per-client rank, the local learning rate, and data for an init from data
    (LoRA-SB): the clients' shards where this party has them (in-process; None on Flower, where
    no party sees the others' data), and `public_blocks(source, n)`: n blocks of a public corpus."""

    seed: int
    model_type: str
    r_max: int | None = None
    train_lr: float = 5e-4
    shards: Mapping[str, Any] | None = None
    public_blocks: Callable[[str, int], torch.Tensor] | None = None


@dataclass(frozen=True)
class EngineNeed:
    """Something the adapter needs from the engine (`EngineCapabilities.<capability>`), with the
    problem to report where the engine lacks it."""

    capability: str
    field: str
    value: Any
    reason: str
    fix: str


class Adapter(Protocol):
    """One adapter kind (module docstring).

    inject(model, ctx): add the adapter to `model` in place (seeded; only its tensors train).
    parameters / state / load_: its tensors by state key; what travels (detached fp32 CPU
        copies); load a state (keys a subset of `parameters`).
    scale: s of the update (alpha / r; 1 for LoRA-SB).
    client_variants / use_client_: per-client variants ({client: n}, e.g. expert counts) and
        setting the model up for one client's variant.
    param_groups(keys): the trained keys split into groups; the first trains on the client's
        steps, a second may follow its own schedule (`ParamGroup`).
    aux_loss(model): the weighted auxiliary loss of the last forward pass, or None.
    state_metrics(model, state): facts about a trained adapter state for the client's round
        record (keys 'adapter_*', averaged over clients in the round's; e.g. an effective rank).
    export(...): write the adapter where a user loads it (PEFT format where PEFT has the method).
    problems / client_problems / engine_needs: what `fedtune validate` reports about its options.
    """

    kind: ClassVar[str]
    algebra: ClassVar[Algebra]
    frozen_suffixes: ClassVar[tuple[str, ...]]  # shared frozen tensors: never trained, never sent back
    packs: ClassVar[bool]  # its forward keeps each token's position: rows may hold several examples (train.packing)

    def inject(self, model: Any, ctx: InjectContext) -> Any: ...

    def parameters(self, model: Any) -> dict[str, torch.nn.Parameter]: ...

    def state(self, model: Any) -> AdapterState: ...

    def load_(self, model: Any, state: AdapterState) -> None: ...

    def scale(self, model: Any) -> float: ...

    def use_client_(self, model: Any, variant: int | None) -> None: ...

    def client_variants(self, client_ids: Sequence[str]) -> dict[str, int]: ...

    def param_groups(self, keys: Sequence[str]) -> list[ParamGroup]: ...

    def aux_loss(self, model: Any) -> torch.Tensor | None: ...

    def state_metrics(self, model: Any, state: AdapterState) -> dict[str, float]: ...

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path: ...

    def problems(self, *, dp: bool, dp_sgd: bool) -> list[Problem]: ...

    def client_problems(self, client_ids: Sequence[str]) -> list[Problem]: ...

    def engine_needs(self) -> list[EngineNeed]: ...


@dataclass(frozen=True)
class AdapterBase:
    """Defaults of the optional parts of the contract (an adapter without them overrides nothing)."""

    kind: ClassVar[str]
    algebra: ClassVar[Algebra]
    frozen_suffixes: ClassVar[tuple[str, ...]] = ()
    packs: ClassVar[bool] = True

    def parameters(self, model: Any) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def state(self, model: Any) -> AdapterState:
        """What travels: the adapter's tensors as detached fp32 CPU copies."""
        return detached(self.parameters(model))

    def load_(self, model: Any, state: AdapterState) -> None:
        """Copy `state` into the adapter's tensors (shapes as the model's)."""
        params = self.parameters(model)
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def use_client_(self, model: Any, variant: int | None) -> None:
        """Set the model up for one client (its variant, e.g. its expert count); default: nothing."""

    def client_variants(self, client_ids: Sequence[str]) -> dict[str, int]:
        """Per-client variants in client-id order ({} when every client has the same adapter)."""
        return {}

    def param_groups(self, keys: Sequence[str]) -> list[ParamGroup]:
        return [ParamGroup("adapter", tuple(sorted(keys)))]

    def aux_loss(self, model: Any) -> torch.Tensor | None:
        """The weighted auxiliary loss of the last forward pass (None: none)."""
        return None

    def state_metrics(self, model: Any, state: AdapterState) -> dict[str, float]:
        """Facts about a trained state for the round records (keys 'adapter_*'); default: none."""
        return {}

    def problems(self, *, dp: bool, dp_sgd: bool) -> list[Problem]:
        """Bad combinations of these options with the run (DP anywhere, DP-SGD on clients)."""
        return []

    def client_problems(self, client_ids: Sequence[str]) -> list[Problem]:
        """Problems with per-client options for these clients."""
        return []

    def engine_needs(self) -> list[EngineNeed]:
        return []


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` ready for a matmul with adapter weights of `dtype`: under autocast the matmul casts both
    to its own dtype, so casting the activation to the fp32 adapter's dtype first only copies it
    (PEFT's LoRA layers skip the same cast, `client.train.autocast`); outside autocast it is cast."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(dtype)


ADAPTERS: Registry[type[AdapterBase]] = Registry("adapter kind")


def no_dropout(dropout: float, why: str) -> list[Problem]:
    """The problem of an `adapter.dropout` set for a kind that has none (`why`: what it has instead)."""
    if dropout == 0.0:
        return []
    return [Problem("adapter.dropout", dropout, why, "drop adapter.dropout (or set it to 0)")]


def detached(sd: Mapping[str, torch.Tensor]) -> AdapterState:
    """Detached fp32 CPU copies of adapter tensors (what travels)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def adapter_kind(model: Any) -> str:
    """The kind recorded on `model` by its injection (a bare PEFT injection: 'lora')."""
    return str(getattr(model, "__dict__", {}).get(KIND_MARK, DEFAULT_KIND))


def adapter_of(model: Any) -> Adapter:
    """The registered adapter of the kind injected into `model`, with default options: serves
    the operations that read everything they need from the model (state, load, parameters)."""
    cls: Any = ADAPTERS.get(adapter_kind(model))
    adapter: Adapter = cls()
    return adapter


def schedule_problems(adapter: Adapter) -> list[Problem]:
    """Under DP-SGD: every parameter group on its own schedule (declared by `param_groups`; the
    schedule is the options', not the keys') takes plain steps outside DP-SGD's clipping, noise and
    accounting, so it is refused, whatever the adapter kind."""
    return [
        Problem(
            f"adapter.{g.name}_every",
            g.every,
            f"the adapter's {g.name} group takes its own steps (on the validation split) outside DP-SGD's "
            "clipping, noise and accounting",
            f"set adapter.{g.name}_every: 0 (the group then trains inside DP-SGD) or drop train.dp_sgd",
        )
        for g in adapter.param_groups(())
        if g.every > 0
    ]
