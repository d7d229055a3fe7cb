"""The `train` section of an experiment: local training on each client (its options' models)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from fedtune.config.inputs import _Strict


class DPSGDConfig(_Strict):
    """Sample-level DP-SGD on every client (Abadi et al. 2016): Poisson-sampled batches,
    per-example gradient clipping, Gaussian noise; accounted per client (RDP)."""

    noise_multiplier: float = Field(1.0, gt=0.0, description="sigma: noise std = sigma * clip on the summed gradient")
    clip: float = Field(1.0, gt=0.0, description="C: bound on each example's gradient norm (adapter parameters)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="epsilon is reported at this delta")
    target_epsilon: float | None = Field(
        None, gt=0.0, description="stop the run before any client's epsilon would exceed this"
    )
    unit: Literal["block", "document"] = Field(
        "block",
        description="the unit of privacy: 'block' (one block_size-token block of the concatenated stream; no "
        "bound for a document: adding or removing one shifts every later block) or 'document' (each document "
        "is packed on its own, padded, and all its blocks are sampled, clipped and counted together as one "
        "example)",
    )


class GhostNoiseConfig(_Strict):
    """Ghost Noise Injection (Kosson et al., arXiv:2305.17205): during local training, the output
    of every RMSNorm / LayerNorm is shifted and scaled by the statistics of a random ghost batch
    drawn with replacement from the micro-batch's tokens (seeded; off at evaluation;
    `fedtune.client.ghost_noise`)."""

    batch_size: int = Field(
        16, ge=2, description="ghost batch size N: the shift's variance is var / N (smaller = more noise)"
    )
    eps: float = Field(1e-3, gt=0.0, description="added to both variances of the scale ratio")
    last: int | None = Field(
        None,
        ge=1,
        description="inject only at the last `last` norm modules (in module order; 1 = the final norm before "
        "the LM head); None = every norm (BENCHMARKS: on a pretrained LLM every norm compounds the noise)",
    )


class TrainConfig(_Strict):
    """Local training on each client, every round."""

    steps: int = Field(10, ge=1, description="optimizer steps per round (ignored when epochs is set)")
    epochs: float | None = Field(None, gt=0.0, description="local epochs per round, instead of steps")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0.0)
    client_lr: dict[str, Annotated[float, Field(gt=0.0)]] | None = Field(
        None,
        description="per-client local learning rates {client id: lr}; the other clients use lr "
        "(`fedtune tune --per-client` picks each from that client's own validation split)",
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimizer ('sgd': no momentum)")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast (about 1.5x faster on AVX512-BF16 CPUs, far slower where bf16 is emulated); "
        "'auto': on where the device runs bf16 natively (see model.dtype), and under a bf16 base",
    )
    prox_mu: float = Field(
        0.0, ge=0.0, description="FedProx proximal term mu/2 ||w - w_received||^2 (arXiv:1812.06127)"
    )
    sam_rho: float = Field(
        0.0,
        ge=0.0,
        description="sharpness-aware local steps (SAM, arXiv:2010.01412): the gradient at w + rho g / ||g||; "
        "0 = plain steps (DFedSAM: strategy.name dfedsam with e.g. 0.05)",
    )
    dp_sgd: DPSGDConfig | None = Field(
        None,
        description="sample-level differential privacy on each client (per-example clipping + noise; "
        "batches are Poisson samples of expected size batch_size * grad_accum; max_grad_norm is not used)",
    )
    ghost_noise: GhostNoiseConfig | None = Field(
        None, description="Ghost Noise Injection as a regulariser of the local step (off by default)"
    )
    packing: bool = Field(
        False,
        description="padding-free packing: a batch's right-padded examples (instruction data) run end to end in "
        "fewer rows, each attending only to itself at its own positions (same loss, fewer padding tokens; "
        "fedtune.client.packing); text data is already packed blocks",
    )

    @model_validator(mode="after")
    def _exclusive_options(self) -> TrainConfig:
        if self.ghost_noise is not None and self.dp_sgd is not None:
            raise ValueError(
                "train.ghost_noise mixes the statistics of a batch's examples into each one, so one example's "
                "gradient depends on the others and DP-SGD's per-example bound no longer holds; drop "
                "train.ghost_noise or train.dp_sgd"
            )
        if self.packing and self.dp_sgd is not None:
            raise ValueError(
                "train.packing packs a batch's examples into shared rows, but DP-SGD computes each example's "
                "gradient alone (nothing to pack); drop train.packing or train.dp_sgd"
            )
        return self
