"""The serverless sampler: every peer computes the same roles from (seed, round, membership),
whatever order it lists the membership in; the fixed scheme takes the k peers of smallest seeded
hash, the Poisson scheme each peer with probability q."""

import hashlib

import pytest

from fedtune.peer_sampling import HashSampler, hash_sample, peer_rank

PEERS = [f"p{i}" for i in range(10)]


def sha_rank(seed: int, role: str, rnd: int, peer: str) -> int:
    """The rank written out: the first 8 bytes of SHA-256 of the labels, little-endian, 63 bits."""
    h = hashlib.sha256(repr((seed, "peer-role", role, rnd, peer)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def test_every_peer_computes_the_same_roles_in_any_order() -> None:
    sampler = HashSampler(fraction=0.3, seed=7)
    views = [PEERS, PEERS[::-1], sorted(PEERS, key=lambda p: hash(p) % 5)]  # each peer's own listing
    for rnd in range(1, 6):
        roles = {sampler.roles(rnd, view) for view in views}
        assert len(roles) == 1
        (r,) = roles
        assert len(r.trainers) == 3 and r.trainers == r.mixers  # round(0.3 * 10); gossip: train = mix
    assert len({sampler.roles(rnd, PEERS).trainers for rnd in range(1, 6)}) > 1  # fresh each round


def test_the_fixed_sample_is_the_k_smallest_ranks() -> None:
    assert peer_rank(3, "active", 2, "p4") == sha_rank(3, "active", 2, "p4")
    expect = tuple(sorted(sorted(PEERS, key=lambda p: sha_rank(3, "active", 2, p))[:4]))
    assert HashSampler(0.4, seed=3).roles(2, PEERS).trainers == expect
    assert hash_sample(PEERS, 4, 3, 2, "active") == expect
    assert hash_sample(PEERS, 20, 3, 2, "active") == tuple(sorted(PEERS))  # k >= n: everyone
    assert len(HashSampler(0.01, seed=3, min_peers=2).roles(2, PEERS).trainers) == 2  # at least min_peers


def test_poisson_roles_are_independent_coin_flips_with_rate_q() -> None:
    members = [f"p{i}" for i in range(2000)]
    picked = HashSampler(0.25, seed=1, scheme="poisson").roles(1, members).trainers
    # Binomial(2000, 1/4): mean 500, sd 19.4; 5 sd either side
    assert abs(len(picked) - 500) < 5 * 19.4
    assert set(picked) == {p for p in members if sha_rank(1, "active", 1, p) / 2**63 < 0.25}


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_a_smaller_membership_samples_among_itself(fraction: float) -> None:
    online = PEERS[:6]
    r = HashSampler(fraction, seed=0).roles(4, online)
    assert set(r.trainers) <= set(online) and len(r.trainers) == round(fraction * 6)
