"""Canaries for one-run privacy auditing (Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run", NeurIPS 2023, arXiv:2305.08846): m blocks of random tokens, each placed in one
chosen client's training split, and each *included* independently with probability 1/2 (the
paper's S_i in {-1, +1}). The auditor (`fedtune audit`) later guesses from the final model which
canaries were trained on and turns its correct guesses into a lower bound on epsilon
(`privacy/audit.py`).

What a canary tests (its unit). One canary is one training block of `data.block_size` tokens in
one client's training split, never cut by `data.max_train_blocks`, never in validation or test.
Flipping S_i adds or removes exactly that block, so the audit measures leakage about **one
example of one client** through everything that client sends:
- DP-SGD (`train.dp_sgd`, unit `block`, or `document`: a canary is a document of one block) is
  accounted for exactly this neighbour (add / remove one example of that client), so the canary
  client's `sample_epsilon` is the upper bound the lower bound is compared with.
- DP-FedAvg's epsilon is client level: neighbours add or remove a client's whole contribution. A
  canary changes *part* of one client's data, i.e. that client's clipped update is replaced by
  another clipped update. Going from one to the other through "client absent" gives group size 2:
  an (eps, delta) client-level guarantee implies (2 eps, (1 + e^eps) delta) for a canary
  (and eps itself if the accountant used the replace-one relation). The audit therefore tests
  *example-level leakage through a client*, which the client-level guarantee bounds (at group
  size 2), but a canary is not a whole client: an attack on whole clients could get more.
- Every canary of the audit lives in one of `audit.clients`; the bound holds for the canary
  with the largest epsilon, so the comparison uses the largest upper bound over those clients.

The canaries and the inclusion bits come from the audit's own seed (`audit.seed`; by default a
secret from the OS), independent of the training randomness, and are written only to
RUN/audit/canaries.json (owner-readable only): the records never say which canaries were used.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.data.blocks import Shard
from fedtune.errors import ConfigError, Problem
from fedtune.files import write_atomic_with
from fedtune.seeding import numpy_rng

SECRET = Path("audit") / "canaries.json"  # under the run directory


@dataclass(frozen=True)
class Canaries:
    """m canaries: `tokens` [m, block_size] (int64), the client of each, and whether each was
    included in that client's training split (the secret bits the auditor scores against)."""

    seed: int
    tokens: torch.Tensor
    clients: tuple[str, ...]
    included: tuple[bool, ...]

    def train_blocks(self) -> dict[str, torch.Tensor]:
        """{client: its included canaries [k, block_size]} (clients with none are left out)."""
        out: dict[str, list[int]] = {}
        for i, (cid, inc) in enumerate(zip(self.clients, self.included)):
            if inc:
                out.setdefault(cid, []).append(i)
        return {cid: self.tokens[idx] for cid, idx in out.items()}

    def to_json(self) -> str:
        return json.dumps(
            {
                "seed": self.seed,
                "clients": list(self.clients),
                "included": [int(x) for x in self.included],
                "tokens": self.tokens.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Canaries:
        d = json.loads(text)
        tokens = torch.tensor(d["tokens"], dtype=torch.long)
        return cls(int(d["seed"]), tokens, tuple(d["clients"]), tuple(bool(x) for x in d["included"]))


def make_canaries(seed: int, count: int, block_size: int, token_ids: Sequence[int], clients: Sequence[str]) -> Canaries:
    """`count` canaries of `block_size` tokens drawn uniformly from `token_ids`, canary i in
    clients[i mod n], each included with probability 1/2 (independent draws from `seed`)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    tokens = ids[numpy_rng(seed, "audit", "tokens").integers(0, len(ids), size=(count, block_size))]
    included = numpy_rng(seed, "audit", "inclusion").random(count) < 0.5
    owner = tuple(clients[i % len(clients)] for i in range(count))
    return Canaries(seed, torch.from_numpy(tokens), owner, tuple(bool(x) for x in included))


def canary_clients(chosen: int | Sequence[str], client_ids: Sequence[str], seed: int) -> list[str]:
    """The clients that get canaries: the ids given (checked), or `chosen` ids drawn with `seed`."""
    if isinstance(chosen, int):
        if chosen > len(client_ids):
            raise ConfigError(
                [Problem("audit.clients", chosen, f"more than the {len(client_ids)} clients", "use fewer clients")]
            )
        pick = numpy_rng(seed, "audit", "clients").choice(len(client_ids), size=chosen, replace=False)
        return [sorted(client_ids)[int(i)] for i in sorted(pick)]
    unknown = sorted(set(chosen) - set(client_ids))
    if unknown:
        have = ", ".join(list(client_ids)[:10])
        raise ConfigError([Problem("audit.clients", unknown, "unknown client ids", f"use ids among: {have}")])
    return list(chosen)


def canary_token_ids(tokenizer: Any) -> list[int]:
    """Token ids a canary may use: the tokenizer's ids without its special tokens."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def run_canaries(
    run_dir: Path,
    count: int,
    chosen: int | Sequence[str],
    seed: int | None,
    block_size: int,
    token_ids: Sequence[int],
    client_ids: Sequence[str],
) -> Canaries:
    """A run's canaries: read from RUN/audit/canaries.json when the run has them (resume, `fedtune
    eval`), else made and written there when the run directory exists (a new run), else made from
    a throwaway seed (`fedtune validate`: only shapes and client ids are checked)."""
    path = run_dir / SECRET
    if path.exists():
        return Canaries.from_json(path.read_text())
    audit_seed = seed if seed is not None else secrets.randbits(63)
    canaries = make_canaries(audit_seed, count, block_size, token_ids, canary_clients(chosen, client_ids, audit_seed))
    if run_dir.is_dir():
        write_private(path, canaries.to_json())
    return canaries


def write_private(path: Path, text: str) -> None:
    """Write `path` atomically, readable by its owner only (0600 from creation, whatever the umask)."""
    write_atomic_with(path, lambda f: f.write(text.encode()), mode=0o600)


def add_train_blocks(shard: Shard, blocks: torch.Tensor | None) -> Shard:
    """`shard` with `blocks` [k, T] appended to its training split: each a document of its own
    (DP-SGD unit 'document') whose every token is a target (loss masks, where the shard has them)."""
    if blocks is None or blocks.shape[0] == 0:
        return shard
    k = blocks.shape[0]
    train = torch.cat([shard.train, blocks.to(shard.train.dtype)])
    doc = shard.train_doc
    if doc is not None:
        first = int(doc.max()) + 1 if doc.numel() else 0
        doc = torch.cat([doc, torch.arange(first, first + k, dtype=doc.dtype)])
    mask = shard.train_mask
    if mask is not None:
        mask = torch.cat([mask, torch.ones_like(blocks, dtype=torch.bool)])
    return replace(shard, train=train, train_doc=doc, train_mask=mask)
