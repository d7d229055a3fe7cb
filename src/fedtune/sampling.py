"""Which clients take part in a round: fixed-size sampling without replacement (k of n) or
Poisson sampling (each client independently with probability q). The DP accountant is told the
scheme and the real rate (`components.run_context`). With an availability trace
(`sampling.availability`) the draw is among the clients online that round.

Where the draws come from follows `privacy.randomness`: 'seeded' derives them from (seed, round),
so anyone holding the config knows who took part in every round (reproducible simulation); with
'secure' they come from the operating system's CSPRNG (`random.SystemRandom`) and are never
stored, so amplification by subsampling, which assumes a secret sample, holds against a party
that sees only what the run releases (the server's own records do list each round's trainers)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedtune.config.schema import AvailabilityConfig, SamplingConfig
from fedtune.errors import Problem
from fedtune.seeding import numpy_rng


def sample_size(n: int, fraction: float, min_clients: int) -> int:
    """k = min(n, max(min_clients, round(fraction * n))): the fixed scheme's sample size."""
    return min(n, max(min_clients, round(fraction * n)))


def evaluation_clients(client_ids: Sequence[str], n: int | None, seed: int) -> list[str]:
    """The clients scored at every evaluation: a seeded sample of n, the same every round (all if None)."""
    if n is None or n >= len(client_ids):
        return list(client_ids)
    picked = numpy_rng(seed, "evaluation-sample").choice(len(client_ids), size=n, replace=False)
    return sorted(client_ids[i] for i in picked)


SAMPLING_NOTES = {
    "seeded": "seeded: the sample follows from the config (public to anyone holding it)",
    "secure": "secure: drawn from the OS CSPRNG each round, never stored",
}


def sample_clients(
    client_ids: Sequence[str],
    fraction: float,
    min_clients: int,
    seed: int,
    rnd: int,
    scheme: str = "fixed",
    randomness: str = "seeded",
) -> list[str]:
    """This round's participants, sorted. 'poisson' may return none (the round is then skipped).
    `randomness`: 'seeded' (from seed and round) or 'secure' (OS CSPRNG, not reproducible)."""
    n = len(client_ids)
    secret = random.SystemRandom() if randomness == "secure" else None
    if scheme == "poisson":
        if fraction >= 1.0:
            return sorted(client_ids)
        draws = [secret.random() for _ in range(n)] if secret else numpy_rng(seed, "sample-poisson", rnd).random(n)
        return sorted(c for c, u in zip(client_ids, draws) if u < fraction)
    k = sample_size(n, fraction, min_clients)
    if k == n:
        return list(client_ids)
    picked = secret.sample(range(n), k) if secret else numpy_rng(seed, "sample", rnd).choice(n, size=k, replace=False)
    return sorted(client_ids[i] for i in picked)


def online_clients(client_ids: Sequence[str], availability: AvailabilityConfig, seed: int, rnd: int) -> list[str]:
    """The clients online in round `rnd`. 'diurnal': client i has a seeded phase p_i in [0, period)
    and is online iff (rnd + p_i) mod period < w, w = max(1, round(online * period)): each client is
    online in exactly w of every `period` consecutive rounds, at its own time of day."""
    if availability.kind == "always":
        return list(client_ids)
    period = availability.period
    window = max(1, round(availability.online * period))
    phases = numpy_rng(seed, "availability-phase").integers(0, period, size=len(client_ids))
    return [c for c, p in zip(client_ids, phases) if (rnd + int(p)) % period < window]


def sample_round(
    client_ids: Sequence[str], s: SamplingConfig, seed: int, rnd: int, randomness: str = "seeded"
) -> list[str]:
    """This round's participants: the sampling scheme applied to the clients online in `rnd`."""
    online = online_clients(client_ids, s.availability, seed, rnd)
    return sample_clients(online, s.fraction, s.min_clients, seed, rnd, s.scheme, randomness) if online else []


def round_problems(s: SamplingConfig, n: int, k: int, secure: bool) -> list[Problem]:
    """A round size the config can never use: more required updates than a round can have (every
    round would be skipped, nothing trained), or a secure sum over one client (its update)."""
    out = []
    most = k if s.scheme == "fixed" else n  # the most updates a round can have
    if s.min_updates > most:
        out.append(
            Problem(
                "sampling.min_updates",
                s.min_updates,
                f"a round has at most {most} updates ({n} clients, {s.scheme} sampling), so every "
                "round would be skipped and nothing trained",
                f"set sampling.min_updates to at most {most}",
            )
        )
    if secure and s.scheme == "fixed" and k < 2:  # the sum of one is its update
        out.append(
            Problem(
                "sampling.fraction",
                s.fraction,
                f"secure aggregation over {k} client a round reveals that client's update (the sum of one); "
                f"{n} clients, min_clients {s.min_clients}",
                "sample at least 2 clients a round (raise sampling.fraction or set sampling.min_clients: 2)",
            )
        )
    return out


def accounted_sampling_problems(s: SamplingConfig, strategy: str) -> list[Problem]:
    """A strategy whose privacy accounting depends on the sampling (DP-FedAvg): under Poisson
    sampling it releases a noised model every round, so no round may be skipped for few updates."""
    if s.scheme != "poisson" or s.min_updates <= 1:
        return []
    return [
        Problem(
            "sampling.min_updates",
            s.min_updates,
            f"strategy {strategy!r} under Poisson sampling releases a noised model every round (skipping a round "
            "with few updates would reveal how many clients were drawn, which the accountant's "
            "amplification hides)",
            "set sampling.min_updates: 1 (or 0) with Poisson sampling, or use scheme: fixed",
        )
    ]
