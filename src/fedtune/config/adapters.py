"""The adapter section of an experiment: one options model per adapter kind, selected by
`kind` (a discriminated union; re-exported by `fedtune.config.schema`). A new kind adds its
model here and a row to `ADAPTER_CONFIGS`; its code lives in `fedtune.adapters.<kind>`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from fedtune.config.inputs import _Strict


class AdapterOptions(_Strict):
    """Options every adapter kind has (the low-rank factors' rank, scale and targets)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    ranks: list[int] | None = Field(
        None, description="per-client ranks in client-id order (flora, flexlora, hetlora); scale stays alpha/r"
    )
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="'auto' = PEFT's default per architecture (q,v for Llama; c_attn for GPT-2)"
    )

    @model_validator(mode="after")
    def _positive_ranks(self) -> AdapterOptions:
        if self.ranks is not None and (not self.ranks or min(self.ranks) < 1):
            raise ValueError(f"ranks = {self.ranks}: give one positive rank per client, e.g. [4, 8, 16, 16]")
        return self


class AutoRankConfig(_Strict):
    """`adapter.auto` (FedPipe-style, `fedtune.models.auto_rank`): each client's LoRA rank and
    upload bits from its declared resources; the heterogeneous ranks aggregate with a strategy
    that takes them (flora, flexlora, hetlora)."""

    per_client_memory_gb: float | dict[str, float] = Field(
        description="training memory each client has (GB): one number for all, or {client id: GB}"
    )
    budget_mb: float | dict[str, float] | None = Field(
        None, description="upload bytes each client may send per round (MB): one number or {client id: MB}"
    )
    ranks: list[int] = Field([1, 2, 4, 8, 16, 32], min_length=1, description="candidate ranks")
    bits: list[Literal[32, 16, 8, 4, 2]] = Field(
        [32, 16, 8, 4], min_length=1, description="candidate upload bits (32 identity, 16 fp16, 8/4/2 quantize)"
    )

    @model_validator(mode="after")
    def _positive(self) -> AutoRankConfig:
        for key in ("per_client_memory_gb", "budget_mb"):
            value = getattr(self, key)
            values = value.values() if isinstance(value, dict) else [] if value is None else [value]
            if any(v <= 0 for v in values):
                raise ValueError(f"{key} = {value}: give positive numbers, e.g. 8")
        if min(self.ranks) < 1:
            raise ValueError(f"ranks = {self.ranks}: give positive ranks, e.g. [2, 4, 8, 16]")
        return self

    def per_client(self, key: str, client_ids: list[str]) -> dict[str, float]:
        """`per_client_memory_gb` / `budget_mb` as {client: value} ({} when budget_mb is unset)."""
        value = getattr(self, key)
        if value is None:
            return {}
        return dict(value) if isinstance(value, dict) else dict.fromkeys(client_ids, float(value))


class LoraAdapterConfig(AdapterOptions):
    """LoRA through PEFT (arXiv:2106.09685): dW = (alpha / r) B A; the default kind."""

    kind: Literal["lora"] = "lora"
    auto: AutoRankConfig | None = Field(
        None, description="pick each client's rank (and upload bits) from its resources instead of adapter.ranks"
    )

    @model_validator(mode="after")
    def _auto_or_ranks(self) -> LoraAdapterConfig:
        if self.auto is not None and self.ranks is not None:
            raise ValueError("adapter.auto picks the per-client ranks: drop adapter.ranks, or drop adapter.auto")
        return self


class LoraSBAdapterConfig(AdapterOptions):
    """LoRA-SB (arXiv:2411.19557, Fed-SB): dW = B R A, A and B frozen and shared, only R trains."""

    kind: Literal["lora_sb"] = "lora_sb"
    sb_init: str = Field(
        "client",
        description="LoRA-SB init data: 'client' (first client's validation split), "
        "'client:<id>' (a consenting client), or 'source:<name>' (a public corpus)",
    )
    sb_init_blocks: int = Field(8, ge=1, description="blocks of init data for the gradient estimate")
    sb_init_lr: float | None = Field(None, ge=0.0, description="R_0 = -init_lr * S_r (default: train.lr)")


class MoELoraAdapterConfig(AdapterOptions):
    """Mixture of LoRA experts with a router (CoMiGS, arXiv:2409.13931)."""

    kind: Literal["moe_lora"] = "moe_lora"
    experts: int | list[int] = Field(
        2, description="experts per block, or one count per client in client-id order, e.g. [2, 2, 4, 4]"
    )
    top_k: int = Field(2, ge=1, description="experts mixed per token (>= experts: a dense softmax mixture)")
    router: Literal["token", "sequence", "frozen"] = Field(
        "token", description="learned per token, learned per causal prefix, or frozen random"
    )
    moe_modules: Literal["mlp", "mlp+attention"] = Field("mlp", description="blocks that get experts")
    lb_weight: float = Field(0.01, ge=0.0, description="weight of the Switch load-balancing loss")
    router_every: int = Field(
        3,
        ge=0,
        description="every this many expert steps, router_steps router steps on the validation split "
        "(CoMiGS's alternating schedule; 0 = router and experts train jointly on the training split)",
    )
    router_steps: int = Field(1, ge=1, description="router steps each time (CoMiGS: 10 every 30)")
    router_lr: float | None = Field(None, gt=0.0, description="router learning rate (default: train.lr)")

    @model_validator(mode="after")
    def _positive_experts(self) -> MoELoraAdapterConfig:
        counts = self.experts if isinstance(self.experts, list) else [self.experts]
        if not counts or min(counts) < 1:
            raise ValueError(f"experts = {self.experts}: give a positive count, or one per client, e.g. [2, 2, 4, 4]")
        return self

    def max_experts(self) -> int:
        return max(self.experts) if isinstance(self.experts, list) else self.experts


class DoraAdapterConfig(AdapterOptions):
    """DoRA through PEFT (LoRA with use_dora, arXiv:2402.09353): m * (W + s B A) / ||W + s B A||."""

    kind: Literal["dora"] = "dora"


class VeraAdapterConfig(AdapterOptions):
    """VeRA through PEFT (arXiv:2310.11454): diag(b) B diag(d) A, A and B frozen, shared, seeded;
    r is the shared projections' rank; alpha is unused; dropout is VeRA's input dropout."""

    kind: Literal["vera"] = "vera"
    d_initial: float = Field(0.1, gt=0.0, description="initial value of VeRA's vector d (b starts at zero)")


class IA3AdapterConfig(AdapterOptions):
    """(IA)^3 through PEFT (arXiv:2205.05638): learned vectors scale activations elementwise;
    r, alpha and dropout are unused."""

    kind: Literal["ia3"] = "ia3"
    feedforward_modules: list[str] | Literal["auto"] = Field(
        "auto", description="targets whose input is scaled (the rest: their output); 'auto' = PEFT's per architecture"
    )


class LoHaAdapterConfig(AdapterOptions):
    """LoHa through PEFT (FedPara, arXiv:2108.06098): dW = (alpha / r) (B1 A1) * (B2 A2), a
    Hadamard product of two rank-r products; dropout is LoHa's rank dropout."""

    kind: Literal["loha"] = "loha"


class LoKrAdapterConfig(AdapterOptions):
    """LoKr through PEFT (LyCORIS, arXiv:2309.14859): dW = (alpha / r) W1 kron W2; dropout is
    LoKr's rank dropout."""

    kind: Literal["lokr"] = "lokr"
    decompose_factor: int = Field(-1, description="factor of the Kronecker split of each dimension (-1: balanced)")


class PromptTuningAdapterConfig(AdapterOptions):
    """Prompt tuning through PEFT (arXiv:2104.08691): n learned virtual-token embeddings before the
    input; r, alpha, dropout and target_modules are unused."""

    kind: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(8, ge=1, description="virtual tokens put before every input")
    init: Literal["sample_vocab", "random"] = Field(
        "sample_vocab", description="PEFT's init: embeddings of tokens sampled from the vocabulary, or random"
    )


class PrefixTuningAdapterConfig(AdapterOptions):
    """Prefix tuning through PEFT (arXiv:2101.00190): n learned keys and values before every
    attention layer's own; r, alpha, dropout and target_modules are unused."""

    kind: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(8, ge=1, description="prefix positions in front of every layer's keys and values")


#: PEFT's methods beyond LoRA (`fedtune.adapters.dora`, `vera`, `ia3`, `loha`, `lokr`, `prompt_tuning`,
#: `prefix_tuning`)
PeftMethodConfig = (
    DoraAdapterConfig
    | VeraAdapterConfig
    | IA3AdapterConfig
    | LoHaAdapterConfig
    | LoKrAdapterConfig
    | PromptTuningAdapterConfig
    | PrefixTuningAdapterConfig
)


class RMLoraAdapterConfig(AdapterOptions):
    """RM-LoRA (arXiv:2407.12074): LoRA plus an orthogonality-promoting regulariser and random
    gradient masking, which raise the effective rank of s * B @ A at LoRA's parameter count."""

    kind: Literal["rm_lora"] = "rm_lora"
    reg_weight: float = Field(
        1e-3, ge=0.0, description="weight of the orthogonality regulariser on A's rows, B's columns"
    )
    mask_prob: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of LoRA gradient entries zeroed at random in every backward pass"
    )


class SMoREAdapterConfig(AdapterOptions):
    """S'MoRE (arXiv:2504.06426): a tree of low-rank residual experts of several orders, routed
    per token, around each target linear layer; `r` is each residual expert's rank."""

    kind: Literal["smore"] = "smore"
    r: int = Field(2, ge=1, description="rank of each residual expert")
    levels: int = Field(2, ge=1, le=4, description="orders of residuals (layers of the tree)")
    experts: int = Field(2, ge=1, description="residual experts per level (CoMiGS presets share the first ones)")
    fanout: int = Field(2, ge=1, description="children each node routes a token to (>= experts: dense)")
    hidden: int | None = Field(None, ge=1, description="width of a residual's embedding (default: r)")
    gate_dim: int = Field(8, ge=1, description="width of the router's down-projection of the token and of the keys")
    activation: Literal["tanh", "relu", "identity"] = Field("tanh", description="sigma of the propagation")
    router_every: int = Field(
        0, ge=0, description="every this many steps, router_steps router steps on the validation split (0: joint)"
    )
    router_steps: int = Field(1, ge=1, description="router steps each time")
    router_lr: float | None = Field(None, gt=0.0, description="router learning rate (default: train.lr)")
    share_structure: bool = Field(
        True,
        description="CoMiGS shares the tree's structure (inter-level maps W_l, output map W_out) with its "
        "generalists; false: they stay on each client (FedAvg averages everything either way)",
    )


#: The options model of each adapter kind (`adapter.kind` selects one; a new kind adds a row).
ADAPTER_CONFIGS: dict[str, type[AdapterOptions]] = {
    "lora": LoraAdapterConfig,
    "lora_sb": LoraSBAdapterConfig,
    "moe_lora": MoELoraAdapterConfig,
    "dora": DoraAdapterConfig,
    "vera": VeraAdapterConfig,
    "ia3": IA3AdapterConfig,
    "loha": LoHaAdapterConfig,
    "lokr": LoKrAdapterConfig,
    "prompt_tuning": PromptTuningAdapterConfig,
    "prefix_tuning": PrefixTuningAdapterConfig,
    "rm_lora": RMLoraAdapterConfig,
    "smore": SMoREAdapterConfig,
}


def _legacy_defaults() -> dict[str, Any]:
    """Each kind's own options at their defaults, as the flat config of an older fedtune listed
    them (only the kinds it had: newer kinds may reuse a name with another default)."""
    common = set(AdapterOptions.model_fields) | {"kind"}
    return {
        name: f.default
        for model in (LoraAdapterConfig, LoraSBAdapterConfig, MoELoraAdapterConfig)
        for name, f in model.model_fields.items()
        if name not in common
    }


def _default_kind(value: Any) -> Any:
    """A config without `kind` is a LoRA adapter (configs written before adapter kinds existed).
    A config saved by an older fedtune (a run's config.yaml) lists every kind's options: those of
    other kinds at their defaults are dropped; set to anything else, they are reported."""
    if not isinstance(value, dict):
        return value
    kind = value.get("kind", "lora")
    own = ADAPTER_CONFIGS.get(kind)
    if own is None:
        return value  # an unknown kind: reported by the union
    legacy = _legacy_defaults()
    kept = {k: v for k, v in value.items() if k in own.model_fields or k not in legacy or v != legacy[k]}
    return {**kept, "kind": kind}


AdapterConfig = Annotated[
    LoraAdapterConfig
    | LoraSBAdapterConfig
    | MoELoraAdapterConfig
    | RMLoraAdapterConfig
    | SMoREAdapterConfig
    | PeftMethodConfig,
    Field(discriminator="kind"),
    BeforeValidator(_default_kind),
]
