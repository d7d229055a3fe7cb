"""Secure aggregation in-process: pairwise additive masks from pairwise key agreement (Bonawitz et
al., CCS 2017, the masking part), so the server only learns the sum of the clients' updates.

Per round, every participant k makes an X25519 key pair and advertises its public key through the
server. Each pair (k, j) derives the same secret: X25519(sk_k, pk_j) -> HKDF-SHA256 (info binds the
round and the pair) -> a ChaCha20 key whose keystream is the mask m_kj (int64 per coordinate).
Client k uploads, in int64 arithmetic (wrapping),

    x_k + sum_{j > k} m_kj - sum_{j < k} m_jk,     x_k = round(w_k * delta_k * 2^FRAC)

with w_k the strategy's sum weight (n_k for FedAvg, 1 for DP-FedAvg). The masks cancel in the sum
over the round's participants, so the server recovers sum_k w_k delta_k / 2^FRAC (fixed-point
error <= n / 2^(FRAC+1) per coordinate) and nothing else: it sees every masked upload, every
public key and the run seed, none of which gives a pair's secret.

The key pairs come from the OS CSPRNG with `privacy.randomness: secure`; with 'seeded' they are
derived from the run seed, so a simulation is reproducible, and anyone holding the config can
unmask (simulation only, named so in the records). The participants are the clients that will
reply (the in-process engine knows its injected dropouts before masking); if a masked upload is
lost or rejected after masking, the round is aborted (its masks would not cancel), never summed
wrong: Bonawitz et al.'s secret-shared recovery is what Flower's SecAgg+ adds on a deployment.
A round with one participant (after dropouts) is not run: the sum of one is its update
(`engines/inprocess.py`; fixed-size sampling of fewer than 2 is refused at validation). The sum
itself is what is released: n - 1 participants colluding with the server learn the n-th update.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtune.errors import Problem
from fedtune.types import AdapterState, ClientUpdate

SECURE_SUM = "secure-sum"  # the id of the one update a strategy sees under secure aggregation
FRAC = 24  # fractional bits of the fixed-point encoding


def to_fixed(delta: AdapterState, weight: float) -> AdapterState:
    return {k: torch.round(v.double() * weight * 2.0**FRAC).to(torch.int64) for k, v in delta.items()}


def new_private_key(mode: str, seed: int, rnd: int, client_id: str) -> bytes:
    """A client's X25519 private key for one round: OS entropy ('secure') or from the seed ('seeded')."""
    if mode == "secure":
        key = X25519PrivateKey.generate()
    else:
        key = X25519PrivateKey.from_private_bytes(
            hashlib.sha256(repr((seed, "secagg", rnd, client_id)).encode()).digest()
        )
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_key(private: bytes) -> bytes:
    pub = X25519PrivateKey.from_private_bytes(private).public_key()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_mask(
    private: bytes, peer_public: bytes, rnd: int, a: str, b: str, shapes: Mapping[str, torch.Size]
) -> AdapterState:
    """m_ab (= m_ba): a ChaCha20 keystream keyed by HKDF(X25519(sk, pk_peer)), as int64 tensors."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((a, b))
    info = f"fedtune-secagg|{rnd}|{lo}|{hi}".encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    keys = sorted(shapes)
    total = sum(int(torch.Size(shapes[k]).numel()) for k in keys)
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * total))
    flat = torch.frombuffer(bytearray(stream), dtype=torch.int64)
    out, i = {}, 0
    for k in keys:
        n = int(torch.Size(shapes[k]).numel())
        out[k] = flat[i : i + n].reshape(shapes[k]).clone()
        i += n
    return out


def mask(fixed: AdapterState, me: str, private: bytes, peer_keys: Mapping[str, bytes], rnd: int) -> AdapterState:
    """x_me + sum_{j > me} m_{me,j} - sum_{j < me} m_{j,me} (int64, wrapping), over the peers."""
    out = {k: v.clone() for k, v in fixed.items()}
    shapes = {k: v.shape for k, v in fixed.items()}
    for other in sorted(peer_keys):
        if other == me:
            continue
        m = pair_mask(private, peer_keys[other], rnd, me, other, shapes)
        sign = 1 if me < other else -1
        for k in out:
            out[k] += sign * m[k]
    return out


def unmask_sum(masked: Sequence[AdapterState]) -> AdapterState:
    """The float sum of the clients' weighted updates, from their masked fixed-point uploads."""
    total = {k: torch.zeros_like(v) for k, v in masked[0].items()}
    for m in masked:
        for k in total:
            total[k] += m[k]
    return {k: (v.double() / 2.0**FRAC).float() for k, v in total.items()}


@dataclass(frozen=True)
class MaskTransform:
    """The last client-side step under secure aggregation: fixed point, weighted by the
    strategy's sum weight ('examples' = n_k, 'uniform' = 1), then masked with the round's
    other participants, from this client's private key (in its ClientState) and their public keys."""

    weighting: str = "examples"

    def __call__(self, delta: AdapterState, job: Any, shard: Any, state: Any) -> AdapterState:
        weight = 1.0 if self.weighting == "uniform" else float(shard.num_examples)
        return mask(to_fixed(delta, weight), job.client_id, state.secagg_key, job.peer_keys, job.round)


def secure_sum(updates: Sequence[ClientUpdate], weighting: str = "examples") -> ClientUpdate:
    """The one update a strategy sees under secure aggregation: sum_k w_k delta_k / sum_k w_k
    (w_k = n_k, the FedAvg weight, or 1), recovered from the masked fixed-point uploads (the masks
    cancel in the sum)."""
    n = sum(1.0 if weighting == "uniform" else float(u.num_examples) for u in updates)
    total = unmask_sum([u.delta for u in updates])
    return ClientUpdate(SECURE_SUM, {k: v / n for k, v in total.items()}, n, {}, 0, 0)  # type: ignore[arg-type]


def uplink_codec_problems(codec: str) -> list[Problem]:
    """A client uploads its masked fixed-point share (int64 words), which an uplink codec cannot
    compress (in-process it was silently left as it was): only the identity codec, on every engine."""
    if codec == "identity":
        return []
    return [
        Problem(
            "codec.name",
            codec,
            "under secure aggregation a client uploads its masked fixed-point share (int64 words), which an "
            "uplink codec cannot compress (in-process it was silently left as it was)",
            "use codec: identity (a downlink_codec still compresses what the server sends)",
        )
    ]
