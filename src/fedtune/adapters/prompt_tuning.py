"""Prompt tuning through PEFT (Lester et al., arXiv:2104.08691): n learned "virtual token"
embeddings P [n, d] are put before the embedded input, and only P trains:

    h_0 = [P ; E(x_1) ... E(x_T)]    positions 0..n-1 for P, n..n+T-1 for x (as PEFT's PeftModel)

P is PEFT's own `PromptEmbedding` from a `PromptTuningConfig` (init: embeddings of n tokens
sampled from the vocabulary, PEFT's SAMPLE_VOCAB, or PEFT's random init); it exports as PEFT
saves prompt tuning (`prompt_embeddings` + the config), which `PeftModel.from_pretrained` loads.

Not PEFT's wrapper model, because fedtune's callers index positions: PeftModel drops the
`position_ids` a left-padded batch needs and returns n extra logits in front. Here hooks on the
model itself do what PeftModel's forward does, in the caller's frame: the first (uncached) call
gets P in front, its attention mask, labels, positions and `logits_to_keep` indices extended or
shifted by n, and the n virtual positions are cut from its logits and hidden states; a call on a
cache (which holds P's keys and values) gets its mask extended and its positions shifted by n.
So every caller sees logits aligned with its own tokens, and the model stays the HF model.

Not a product of LoRA factors, nothing to merge into a weight: only the FedAvg family aggregates
it (the prompts are averaged), and there is no merged export. A caller that builds its own 4-D
attention mask gets an error naming the kind (GEM's `task: embedding` takes LoRA only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fedtune.adapters.base import ADAPTERS, KIND_MARK, AdapterBase, Algebra, InjectContext, no_dropout
from fedtune.adapters.lora import write_peft_dir
from fedtune.adapters.peft_tuner import seeded
from fedtune.config.adapters import PromptTuningAdapterConfig
from fedtune.errors import FedtuneError, Problem
from fedtune.types import AdapterState

ENCODER = "fedtune_prompt_encoder"  # the PromptEmbedding's name as a submodule of the model
STATE_KEY = "prompt_embeddings"  # as PEFT saves prompt tuning
CONFIG = "_fedtune_prompt_config"  # the PromptTuningConfig the injection used (for the export)


def _prompt(model: nn.Module) -> torch.Tensor:
    encoder: Any = model.get_submodule(ENCODER)
    weight: torch.Tensor = encoder.embedding.weight
    return weight


def _cached(kwargs: dict[str, Any]) -> bool:
    past = kwargs.get("past_key_values")
    return past is not None and int(past.get_seq_length()) > 0


def caller_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], n: int, kind: str, what: str
) -> tuple[dict[str, Any], int]:
    """A hooked call's inputs as keywords (a positional input_ids named) and its batch size, with
    the caller's 2-D attention mask extended by n ones in front for the n `what` placed before
    its tokens; a 4-D mask (a caller that builds its own) is refused, naming `kind`. Shared by
    the prompt-learning kinds (this one, `prefix_tuning`)."""
    if args:  # model(ids): the positional input_ids
        kwargs = {"input_ids": args[0], **kwargs}
    ids = kwargs.get("input_ids")
    batch = int((ids if ids is not None else kwargs["inputs_embeds"]).shape[0])
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise FedtuneError(
                f"adapter.kind {kind!r} takes a 2-D attention mask, got {mask.dim()}-D: a caller that "
                f"builds its own attention mask cannot place the {what} (use another adapter kind)"
            )
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    return kwargs, batch


def _before(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model's inputs in the caller's frame -> with the virtual tokens (module docstring)."""
    prompt = _prompt(model)
    n = prompt.shape[0]
    kwargs, batch = caller_inputs(args, kwargs, n, "prompt_tuning", "virtual tokens")
    cached = _cached(kwargs)
    pos = kwargs.get("position_ids")
    cache_pos = kwargs.get("cache_position")
    if cached:
        if pos is not None:
            kwargs["position_ids"] = pos + n
        if cache_pos is not None:
            kwargs["cache_position"] = cache_pos + n
        return (), kwargs
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(kwargs.pop("input_ids"))
    else:
        kwargs.pop("input_ids", None)
    kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
    virtual = torch.arange(n, device=embeds.device)
    if pos is not None:
        kwargs["position_ids"] = torch.cat([virtual.expand(pos.shape[0], -1).to(pos.dtype), pos + n], dim=1)
    if cache_pos is not None:
        kwargs["cache_position"] = torch.cat([virtual.to(cache_pos.dtype), cache_pos + n])
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor):
        kwargs["logits_to_keep"] = keep + n
    return (), kwargs


def _after(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Cut the n virtual positions from an uncached call's full logits and hidden states."""
    if _cached(kwargs) or "inputs_embeds" not in kwargs:
        return output
    n = _prompt(model).shape[0]
    width = kwargs["inputs_embeds"].shape[1]
    logits = getattr(output, "logits", None)
    if logits is not None and logits.shape[1] == width:
        output["logits"] = logits[:, n:]
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output["hidden_states"] = tuple(h[:, n:] for h in hidden)
    return output


@dataclass(frozen=True)
class PromptLearning(AdapterBase):
    """What the prompt-learning kinds share (this one, `prefix_tuning`): one PEFT encoder module,
    added to the model as `encoder`, whose embedding table is the whole trainable state
    (`prompt_embeddings`, as PEFT saves it), kept in the callers' frame by hooks; its PEFT config
    under `config_key` for the export; no scale, no merge, no dropout."""

    options: Any = None  # each kind's own options model (its field overrides this one)
    encoder: ClassVar[str]
    config_key: ClassVar[str]
    trains: ClassVar[str]  # what trains, for the no-dropout problem
    packs: ClassVar[bool] = False  # the virtual tokens go before each row, not before each packed example

    def attach(self, model: Any, encoder: nn.Module, config: Any, *hooks: tuple[str, Any]) -> Any:
        """Freeze the base, add the trainable encoder and the (pre / post) forward hooks."""
        model.requires_grad_(False)
        model.add_module(self.encoder, encoder)
        encoder.requires_grad_(True)
        for when, hook in hooks:
            register = model.register_forward_pre_hook if when == "pre" else model.register_forward_hook
            register(hook, with_kwargs=True)
        model.__dict__[KIND_MARK] = self.kind
        model.__dict__[self.config_key] = config
        return model

    def parameters(self, model: Any) -> dict[str, nn.Parameter]:
        return {STATE_KEY: model.get_submodule(self.encoder).embedding.weight}

    def scale(self, model: Any) -> float:
        return 1.0

    def export(
        self, model: Any, state: AdapterState, out_dir: Path, base_model: str, peft_config: Any, variant: int | None
    ) -> Path:
        """PEFT format: `prompt_embeddings` and the PEFT config (no merged model: virtual tokens
        or prefixes are not a weight offset)."""
        return write_peft_dir({STATE_KEY: state[STATE_KEY]}, model.__dict__[self.config_key], base_model, out_dir)

    def problems(self, *, dp: bool, dp_sgd: bool) -> list[Problem]:
        name = self.kind.replace("_", " ")
        return no_dropout(self.options.dropout, f"{name} has no dropout: only {self.trains} train")


@ADAPTERS.register("prompt_tuning", "Prompt tuning through PEFT: n learned virtual-token embeddings before the input.")
@dataclass(frozen=True)
class PromptTuning(PromptLearning):
    """Prompt tuning through PEFT's PromptEmbedding (arXiv:2104.08691): module docstring."""

    options: PromptTuningAdapterConfig = field(default_factory=PromptTuningAdapterConfig)

    kind: ClassVar[str] = "prompt_tuning"
    algebra: ClassVar[Algebra] = Algebra.PROMPT
    encoder: ClassVar[str] = ENCODER
    config_key: ClassVar[str] = CONFIG
    trains: ClassVar[str] = "the virtual-token embeddings"

    def peft_config(self, model: nn.Module) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit
        from peft.utils.other import _prepare_prompt_learning_config

        init = {"sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM}[self.options.init]
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.options.num_virtual_tokens,
            num_transformer_submodules=1,  # a decoder-only model: one prompt (PeftModel sets the same)
            prompt_tuning_init=init,
        )
        return _prepare_prompt_learning_config(config, model.config)  # token_dim, layers, heads from the base

    def inject(self, model: Any, ctx: InjectContext) -> Any:
        from peft.tuners.prompt_tuning import PromptEmbedding

        config = self.peft_config(model)
        words = model.get_input_embeddings()
        encoder = seeded(lambda: PromptEmbedding(config, words), ctx.seed).to(words.weight.device)
        return self.attach(model, encoder, config, ("pre", _before), ("post", _after))
