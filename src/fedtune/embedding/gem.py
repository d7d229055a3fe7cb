"""GEM: Generative Embedding large language Model (Zhang et al., arXiv:2506.04344).

What the paper says (abstract and secondary summaries; the full text could not be retrieved
here, so the parts marked *chosen* are fedtune's closest well-defined reading):

- New special token(s) are inserted into the text at a random position, splitting it into
  prefix, special tokens, suffix: `prefix [s_1 .. s_k] suffix`.
- The attention mask starts causal; suffix tokens may not attend to prefix tokens (only to the
  special tokens and the suffix), and the special tokens may not attend to each other. The
  special tokens are the only path from prefix to suffix, so predicting the suffix forces them
  to summarise the prefix.
- The objective is next-token prediction ("mixed NTP"): *chosen*: the cross-entropy of the
  suffix tokens under the GEM mask, plus `ntp_weight` times the plain causal next-token loss on
  the unchanged text (keeps generation; the paper's mixing weight is not known here).
- The embedding of a text is *chosen* as the mean of the final-layer hidden states (after the
  model's final norm) at the k special tokens appended after the whole text (an empty suffix).
  With k = 1 this is the last hidden state of one extra token under a plain causal mask, which
  `fedtune embed`'s export reproduces with plain transformers + PEFT (README: "Text embeddings").

The special tokens' input embeddings are a trainable tensor [k, hidden] (state key `GEM_KEY`)
that travels and is aggregated with the adapter; the vocabulary is not resized, so the exported
adapter is a plain PEFT LoRA plus `gem_tokens.safetensors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.client.train import autocast, model_device

GEM_KEY = "gem.tokens"  # adapter-state key of the special tokens' input embeddings [k, hidden]


@dataclass(frozen=True)
class Layout:
    """One row: `prefix` text tokens, `special` GEM tokens, `suffix` text tokens, `pad` padding."""

    prefix: int
    special: int
    suffix: int
    pad: int = 0

    @property
    def length(self) -> int:
        return self.prefix + self.special + self.suffix + self.pad


def allowed_attention(layout: Layout) -> torch.Tensor:
    """GEM's attention pattern [T, T] (True: row i may attend to column j): causal; suffix rows
    do not see the prefix; special tokens do not see each other (each sees itself); a padding
    row sees only itself (no row sees padding: it comes last)."""
    t, p, k, s = layout.length, layout.prefix, layout.special, layout.suffix
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed[p + k : p + k + s, :p] = False
    allowed[p : p + k, p : p + k] = torch.eye(k, dtype=torch.bool)
    allowed[p + k + s :, :] = torch.eye(t, dtype=torch.bool)[p + k + s :]
    return allowed


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean pattern [B, T, T] as the additive 4-D mask [B, 1, T, T] transformers takes as is."""
    zero = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zero.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass(frozen=True)
class GemBatch:
    """A right-padded batch of GEM rows: token ids [B, T] (0 at special and padding positions),
    which special token sits where [B, T] (-1: none), the attention pattern [B, T, T]
    (`allowed_attention` per row), and the targets [B, T] (the token each position predicts;
    -100: none)."""

    ids: torch.Tensor
    special: torch.Tensor
    allowed: torch.Tensor
    labels: torch.Tensor


def gem_batch(prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]], k: int) -> GemBatch:
    """Rows `prefix [s_1 .. s_k] suffix`, right-padded; the targets are the suffix tokens (the
    last special token predicts the first suffix token)."""
    layouts = [Layout(len(p), k, len(s)) for p, s in zip(prefixes, suffixes)]
    t = max(x.length for x in layouts)
    layouts = [Layout(x.prefix, k, x.suffix, t - x.length) for x in layouts]
    ids = torch.zeros(len(layouts), t, dtype=torch.long)
    special = torch.full((len(layouts), t), -1, dtype=torch.long)
    labels = torch.full((len(layouts), t), -100, dtype=torch.long)
    for b, (x, p, s) in enumerate(zip(layouts, prefixes, suffixes)):
        ids[b, : x.prefix] = torch.tensor(list(p), dtype=torch.long)
        ids[b, x.prefix + k : x.prefix + k + x.suffix] = torch.tensor(list(s), dtype=torch.long)
        special[b, x.prefix : x.prefix + k] = torch.arange(k)
        if x.suffix:  # position t predicts token t + 1
            labels[b, x.prefix + k - 1 : x.prefix + k + x.suffix - 1] = torch.tensor(list(s), dtype=torch.long)
    allowed = torch.stack([allowed_attention(x) for x in layouts])
    return GemBatch(ids, special, allowed, labels)


def input_embeds(model: Any, ids: torch.Tensor, special: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The model's token embeddings of `ids` [B, T] with the GEM vectors `tokens` [k, h] placed
    where `special` >= 0: [B, T, h]."""
    emb = model.get_input_embeddings()(ids)
    placed = tokens.to(emb.dtype)[special.clamp(min=0)]  # [B, T, h]
    return torch.where((special >= 0)[..., None], placed, emb)


def _forward(model: Any, batch: GemBatch, tokens: torch.Tensor, bf16: bool, hidden: bool = False) -> Any:
    dev = model_device(model)
    ids, special = batch.ids.to(dev), batch.special.to(dev)
    emb = input_embeds(model, ids, special, tokens)
    mask = additive_mask(batch.allowed.to(dev), torch.bfloat16 if bf16 else emb.dtype)
    with autocast(bf16, dev, model):
        return model(inputs_embeds=emb, attention_mask=mask, output_hidden_states=hidden, use_cache=False)


def split_points(lengths: Sequence[int], gen: torch.Generator) -> list[int]:
    """GEM's random insertion point of each row: a prefix length in [1, L - 1] (at least one
    token on each side), drawn from `gen`."""
    return [int(torch.randint(1, n, (1,), generator=gen)) for n in lengths]


def gem_loss(
    model: Any,
    rows: Sequence[Sequence[int]],
    tokens: torch.Tensor,
    gen: torch.Generator,
    ntp_weight: float,
    bf16: bool = False,
) -> torch.Tensor:
    """GEM's mixed next-token objective on text rows (each >= 2 tokens; module docstring): the
    suffix cross-entropy under the GEM mask with the special tokens inserted at a random point,
    plus `ntp_weight` x the plain causal next-token loss on the same rows."""
    cuts = split_points([len(r) for r in rows], gen)
    batch = gem_batch([r[:c] for r, c in zip(rows, cuts)], [r[c:] for r, c in zip(rows, cuts)], int(tokens.shape[0]))
    logits = _forward(model, batch, tokens, bf16).logits
    labels = batch.labels.to(logits.device)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    if ntp_weight > 0:
        loss = loss + ntp_weight * plain_ntp_loss(model, rows, bf16)
    return loss


def plain_ntp_loss(model: Any, rows: Sequence[Sequence[int]], bf16: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of right-padded text rows under the model's causal mask."""
    dev = model_device(model)
    t = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    att = torch.zeros(len(rows), t, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        att[b, : len(r)] = 1
    labels = ids.masked_fill(att == 0, -100)
    with autocast(bf16, dev, model):
        out = model(input_ids=ids.to(dev), attention_mask=att.to(dev), labels=labels.to(dev), use_cache=False)
    return torch.as_tensor(out.loss)


@torch.no_grad()
def embed_ids(
    model: Any, texts: Sequence[Sequence[int]], tokens: torch.Tensor, batch_size: int = 8, bf16: bool = False
) -> torch.Tensor:
    """GEM embeddings [N, h] of tokenized texts: the k special tokens appended after each text
    (an empty suffix), the mean of their final-layer hidden states."""
    k = int(tokens.shape[0])
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        batch = gem_batch(chunk, [[] for _ in chunk], k)
        hidden = _forward(model, batch, tokens, bf16, hidden=True).hidden_states[-1].float()
        at = (batch.special >= 0).to(hidden.device)[..., None]
        out.append(((hidden * at).sum(1) / k).cpu())
    return torch.cat(out) if out else torch.zeros(0, int(tokens.shape[1]))


@torch.no_grad()
def mean_pooled_ids(model: Any, texts: Sequence[Sequence[int]], batch_size: int = 8) -> torch.Tensor:
    """The baseline: the mean over each text's tokens of the model's final-layer hidden states."""
    dev = model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        t = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        att = torch.zeros(len(chunk), t, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            att[b, : len(r)] = 1
        hidden = model(
            input_ids=ids.to(dev), attention_mask=att.to(dev), output_hidden_states=True, use_cache=False
        ).hidden_states[-1]
        a = att.to(hidden.device)[..., None].float()
        out.append(((hidden.float() * a).sum(1) / a.sum(1)).cpu())
    return torch.cat(out)


def init_tokens(model: Any, k: int, gen: torch.Generator) -> torch.Tensor:
    """Initial GEM vectors [k, h] (*chosen*; the paper's init is not known here): the mean input
    embedding plus seeded noise of 0.1 x the embeddings' per-feature std, so k tokens differ."""
    w: torch.Tensor = model.get_input_embeddings().weight.detach().float().cpu()
    noise = torch.randn(k, int(w.shape[1]), generator=gen)
    return w.mean(0, keepdim=True) + 0.1 * w.std(0, keepdim=True) * noise
