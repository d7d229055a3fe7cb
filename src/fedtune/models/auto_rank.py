"""`adapter.auto`: each client's LoRA rank and upload precision from its declared resources.

FedPipe (Fang et al., arXiv:2404.06448) configures a LoRA adapter per edge server within that
server's resources: it models the pipeline as a mixed-integer linear program over per-server rank,
batch size and quantization under memory and compute budgets. Its full program (time model, weight
importance) is not reproduced here; fedtune keeps its structure and solves this one exactly:

    for each client i, over r in auto.ranks and b in auto.bits:
        maximise (r, b)                      (rank first, then upload precision)
        subject to  memory(r)  <= per_client_memory_gb[i] * 1e9
                    upload(r, b) <= budget_mb[i] * 1e6              (when budget_mb is given)

The constraints are per client and the objective is a sum, so the program splits into one small
enumeration per client. `upload(r, b)` is the length of the real encoded payload: a rank-r LoRA
state of the model's target layers encoded by the codec the bits select (32: identity, 16: fp16,
8/4/2: stochastic quantize), the bytes a client of rank r sends. `memory(r)` is an estimate:

    base weights      n_base * bytes per weight (2 bf16/fp16, 4 fp32, 1 int8, 0.5 NF4)
    adapter           n_adapter(r) * (4 weight + 4 grad + 8 AdamW moments; SGD: 8)
    activations       L * s * b * h * (34 + 5 a s / h) bytes at 16-bit (x2 in fp32), Korthikanti
                      et al. 2022 (arXiv:2205.05198) per transformer layer without recompute;
                      with gradient checkpointing 2 s b h per layer plus one full layer
    logits            b * s * V * 8 (fp32 logits and their gradient)

an upper bound for eager attention (SDPA holds less). The shapes come from the model's config
instantiated on the meta device (no weights load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.0, "4bit": 0.5}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need: parameter count, transformer sizes, and the LoRA targets'
    (name, in_features, out_features)."""

    n_base: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    targets: tuple[tuple[str, int, int], ...]

    def adapter_parameters(self, r: int) -> int:
        return r * sum(i + o for _, i, o in self.targets)


@dataclass(frozen=True)
class Workload:
    """One client's training step: batch x sequence, precision, optimizer, recompute."""

    batch: int
    seq: int
    weight_dtype: str  # a WEIGHT_BYTES key
    bf16: bool  # 16-bit activations (autocast or a 16-bit base)
    optimizer: str  # 'adamw' | 'sgd'
    checkpointing: bool


@dataclass(frozen=True)
class Choice:
    """A client's pick and why (for the round-0 record)."""

    rank: int
    bits: int
    memory_gb: float
    upload_mb: float
    why: str

    def record(self) -> dict[str, Any]:
        return {"rank": self.rank, "bits": self.bits, "memory_gb": round(self.memory_gb, 4),
                "upload_mb": round(self.upload_mb, 6), "why": self.why}  # fmt: skip


def model_shape(model_dir: str, target_modules: Any) -> ModelShape:
    """The model's sizes from its config on the meta device; targets as PEFT matches them (a
    module whose last name is in the list, or every linear layer but the head for 'all-linear')."""
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    head = model.get_output_embeddings()
    targets = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or module is head or isinstance(module, torch.nn.Embedding):
            continue
        linear = isinstance(module, torch.nn.Linear)
        conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
        if not (linear or conv1d):
            continue
        hit = target_modules == "all-linear" or name.rsplit(".", 1)[-1] in set(target_modules)
        if hit:
            i, o = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
            targets.append((name, int(i), int(o)))
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    return ModelShape(
        n_base=sum(p.numel() for p in model.parameters()),
        layers=int(getattr(text, "num_hidden_layers", getattr(text, "n_layer", 1))),
        hidden=int(getattr(text, "hidden_size", getattr(text, "n_embd", 1))),
        heads=int(getattr(text, "num_attention_heads", getattr(text, "n_head", 1))),
        vocab=int(text.vocab_size),
        targets=tuple(targets),
    )


def memory_bytes(shape: ModelShape, r: int, work: Workload) -> float:
    """The training memory estimate of the module docstring, in bytes."""
    s, b, h, a, n_layers = work.seq, work.batch, shape.hidden, shape.heads, shape.layers
    act_scale = 1.0 if work.bf16 else 2.0
    per_layer = s * b * h * (34 + 5 * a * s / h) * act_scale
    activations = (2 * s * b * h * act_scale * n_layers + per_layer) if work.checkpointing else per_layer * n_layers
    state_bytes = 16 if work.optimizer == "adamw" else 8
    return (
        shape.n_base * WEIGHT_BYTES[work.weight_dtype]
        + shape.adapter_parameters(r) * state_bytes
        + activations
        + b * s * shape.vocab * 8
    )


def bits_codec(bits: int) -> tuple[str, dict[str, Any]]:
    """The uplink codec (name, params) that sends `bits` per value."""
    if bits == 32:
        return "identity", {}
    if bits == 16:
        return "fp16", {}
    return "quantize", {"bits": bits}


def upload_bytes(shape: ModelShape, r: int, bits: int) -> int:
    """Bytes of a rank-r LoRA update of the target layers encoded with `bits_codec(bits)`: the
    payload's real length (a zero state has the same length as any other of its shapes)."""
    from fedtune.codecs import CODECS, Chain

    name, params = bits_codec(bits)
    state = {}
    for module, i, o in shape.targets:
        state[f"{module}.lora_A.weight"] = torch.zeros(r, i)
        state[f"{module}.lora_B.weight"] = torch.zeros(o, r)
    payload, _ = Chain((CODECS.get(name)(**params),)).encode(state, None, torch.Generator().manual_seed(0))
    return len(payload)


def choose(
    shape: ModelShape,
    work: Workload,
    ranks: Sequence[int],
    bits: Sequence[int],
    memory_gb: Mapping[str, float],
    budget_mb: Mapping[str, float],
) -> tuple[dict[str, Choice], dict[str, str]]:
    """Each client's (rank, bits), or why none fits: ({client: Choice}, {client: reason})."""
    mem = {r: memory_bytes(shape, r, work) for r in ranks}
    up = {(r, b): upload_bytes(shape, r, b) for r in ranks for b in bits} if budget_mb else {}
    picks: dict[str, Choice] = {}
    infeasible: dict[str, str] = {}
    for cid, gb in memory_gb.items():
        budget = budget_mb.get(cid)
        fits = [
            (r, b) for r in ranks for b in bits if mem[r] <= gb * 1e9 and (budget is None or up[(r, b)] <= budget * 1e6)
        ]
        if not fits:
            r0, b0 = min(ranks), min(bits)
            need = f"rank {r0} needs an estimated {mem[r0] / 1e9:.3g} GB"
            if budget is not None:
                need += f" and {up[(r0, b0)] / 1e6:.3g} MB per upload at {b0} bits"
            infeasible[cid] = need
            continue
        r, b = max(fits)
        why = f"largest rank in {sorted(ranks)} within {gb:g} GB (estimate {mem[r] / 1e9:.3g} GB)"
        if budget is not None:
            why += f", then the most bits in {sorted(bits)} within {budget:g} MB per upload"
        size = up[(r, b)] if budget_mb else upload_bytes(shape, r, b)
        picks[cid] = Choice(r, b, mem[r] / 1e9, size / 1e6, why)
    return picks, infeasible
