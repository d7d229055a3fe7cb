"""Packing a batch's examples into fewer rows (`train.packing`): padding-free packing as far as a
dense attention mask allows.

Instruction examples are right-padded to the longest of their batch (`data.chat.encode_examples`,
then `client.train.trim_padding`), and the model runs the padding too (8.5 % of the tokens on the
demo's data, 11.7 % on `configs/chat.yaml`: BENCHMARKS.md). Packing lays the examples end to end,
first-fit decreasing, into as few rows
as hold them, each row no longer than the longest example, and gives every token its position
inside its own example. transformers (>= 4.53, `masking_utils.find_packed_sequence_indices`) reads
a restart of the positions with no attention mask as the start of a new sequence and builds a
block-diagonal causal mask for every attention kernel it knows (eager, sdpa, flash, and the
`grouped` kernel through the eager mask), so each example attends only to itself, at its own
positions: the loss is the unpacked batch's up to float rounding (tests/unit/test_packing.py, for
every model type in `PACKABLE_MODEL_TYPES`). A row's attention stays within the longest example's
length, so the attention cost never grows; the linear layers run on fewer rows. (One flat row of
every example would leave no padding at all, but under a dense mask its attention grows with the
square of the row; only a varlen flash-attention kernel makes that pay.)

The model types are declared, not probed: each one's forward must pass `position_ids` to its
rotary or learned position embeddings and to `create_causal_mask`; the test runs each listed type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# model types whose forward builds the packed mask from position_ids (each checked by a test)
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gpt2"})


@dataclass(frozen=True)
class Packed:
    """Rows [R, C] holding several examples each: token ids, the target mask (the first token of
    every example is never a target: the token before it belongs to another example), and each
    token's position inside its example (a row's padding continues its last example)."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


def example_lengths(mask: torch.Tensor) -> list[int]:
    """Tokens each right-padded row needs: up to and including its last target (0 for none);
    read on the host (the layout is planned there, the rows are built where the batch is)."""
    mask = mask.to("cpu")
    width = mask.shape[1]
    has = mask.any(dim=1)
    last = width - 1 - torch.flip(mask, dims=[1]).int().argmax(dim=1)
    return [int(n) + 1 if h else 0 for n, h in zip(last.tolist(), has.tolist())]


def bins_first_fit(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped into bins of capacity max(lengths), first-fit decreasing (ties in
    index order); rows of length 0 are left out."""
    cap = max(lengths, default=0)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n == 0:
            continue
        for b, free in enumerate(room):
            if free >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(cap - n)
    return bins


def pack_rows(batch: torch.Tensor, mask: torch.Tensor) -> Packed | None:
    """The examples of right-padded rows `batch` [B, T] with target `mask` [B, T] packed into
    fewer rows; None when packing would not save a row (the batch is then run as it is)."""
    lengths = example_lengths(mask)
    bins = bins_first_fit(lengths)
    if len(bins) >= batch.shape[0]:
        return None
    cap = max(lengths)
    ids = batch.new_zeros((len(bins), cap))
    out_mask = mask.new_zeros((len(bins), cap))
    positions = torch.zeros((len(bins), cap), dtype=torch.long, device=batch.device)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = lengths[i]
            ids[b, at : at + n] = batch[i, :n]
            out_mask[b, at + 1 : at + n] = mask[i, 1:n]
            positions[b, at : at + n] = torch.arange(n, device=batch.device)
            at += n
        last = lengths[members[-1]]
        positions[b, at:] = torch.arange(last, last + cap - at, device=batch.device)
    return Packed(ids, out_mask, positions)
