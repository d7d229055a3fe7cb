"""Empirical lower bounds on epsilon from one training run (Steinke, Nasr and Jagielski, "Privacy
Auditing with One (1) Training Run", NeurIPS 2023, arXiv:2305.08846).

The game. m canaries, each included in training independently with probability 1/2 (S_i = +1)
or not (S_i = -1). After training, the auditor scores every canary and guesses T_i in {-1, 0, +1}
(+1: "in" for the k+ most member-like scores, -1: "out" for the k- least, 0: abstain), r = k+ + k-
guesses in all; W = the number of correct guesses (T_i = S_i).

The bound. If the training algorithm is eps-DP with respect to each canary, W is stochastically
dominated by Binomial(r, q), q = e^eps / (1 + e^eps) (the paper's Theorem 1). Under (eps, delta)-DP
(its Theorem 3, in the computable form the paper evaluates):

    P[W >= v] <= P[B >= v] + 2 m delta max_{i = 1..v} P[v - i <= B < v] / i,   B ~ Binomial(r, q).

Observing v correct guesses therefore rejects "(eps, delta)-DP" at significance alpha whenever the
right-hand side is <= alpha; the reported lower bound is the largest such eps (0 when none). With
several guess counts tried, each is tested at alpha / (number tried) (Bonferroni), so choosing the
best one after seeing the scores keeps the stated confidence.

What the number means: with probability >= 1 - alpha over the canaries' inclusion, the algorithm
as run is not (eps_lower, delta)-DP for the canaries' unit. It is a lower bound for this attack
(a loss-based membership test on the final model); a small value does not show that the
accountant's epsilon is tight or that the training is private against stronger attacks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedtune.errors import FedtuneError


def _binom() -> Any:
    try:
        from scipy import stats
    except ImportError as e:  # scipy comes with the `dp` extra (dp-accounting needs it)
        raise FedtuneError("the privacy audit needs scipy: pip install 'fedtune[dp]'") from e
    return stats.binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W >= v] for an (epsilon, delta)-DP algorithm (Steinke et al. 2023,
    arXiv:2305.08846, Theorems 1 and 3): m canaries, r guesses, v of them correct."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    binom = _binom()
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    tail = float(binom.sf(v - 1, r, q))  # P[B >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    i = np.arange(1, v + 1)
    window = binom.sf(v - i - 1, r, q) - tail  # P[v - i <= B < v], i = 1..v
    return min(1.0, tail + 2 * m * delta * float(np.max(window / i)))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float = 0.05) -> float:
    """The largest epsilon that v correct guesses out of r (m canaries) reject at `significance`
    (Steinke et al. 2023, arXiv:2305.08846): sup{eps : p_value(m, r, v, eps, delta) <= significance},
    0.0 when even eps = 0 is not rejected."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= significance:  # ends: as eps grows, P[B >= v] -> 1
        lo, hi = hi, 2 * hi
    for _ in range(100):  # bisection; keeps p(lo) <= significance < p(hi)
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) <= significance:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return lo


def guesses(scores: Sequence[float], k_in: int, k_out: int) -> np.ndarray:
    """T in {-1, 0, +1}^m: +1 ("in") for the k_in lowest scores (most member-like), -1 ("out") for
    the k_out highest, 0 (abstain) for the rest; ties broken by canary index."""
    s = np.asarray(scores, dtype=np.float64)
    if k_in < 0 or k_out < 0 or k_in + k_out > s.size:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= {s.size}, got {k_in}, {k_out}")
    order = np.argsort(s, kind="stable")
    t = np.zeros(s.size, dtype=np.int64)
    t[order[:k_in]] = 1
    t[order[s.size - k_out :]] = -1
    return t


def default_guess_counts(m: int) -> list[int]:
    """The guess counts r tried (fixed before looking at the scores): m/4, m/2 and m."""
    return sorted({r for r in (m // 4, m // 2, m) if r >= 2})


@dataclass(frozen=True)
class AuditResult:
    """The best bound over the guess counts tried (each at significance / len(tried))."""

    epsilon_lower: float
    confidence: float
    delta: float
    canaries: int
    included: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    tried: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
) -> AuditResult:
    """One-run audit of canary scores (lower = more member-like) against the secret inclusion bits
    (Steinke et al. 2023, arXiv:2305.08846, Algorithm 1 with the bound of Theorem 3): for each
    guess count r, r/2 "in" and r/2 "out" guesses; the bound of the best r, Bonferroni-corrected."""
    m = len(scores)
    if len(included) != m or m < 2:
        raise ValueError(f"need one inclusion bit per score and m >= 2, got {len(included)} bits, {m} scores")
    counts = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    alpha = (1 - confidence) / len(counts)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    best: tuple[float, int, int, int, int] = (0.0, 0, 0, 0, 0)
    tried = []
    for r in counts:
        k_in, k_out = (r + 1) // 2, r // 2
        t = guesses(scores, k_in, k_out)
        v = int(np.sum(t == truth))  # abstentions (0) never match
        eps = epsilon_lower_bound(m, r, v, delta, alpha)
        tried.append({"guesses": float(r), "correct": float(v), "epsilon_lower": eps})
        if eps > best[0] or best[1] == 0:
            best = (eps, r, v, k_in, k_out)
    eps, r, v, k_in, k_out = best
    return AuditResult(eps, confidence, delta, m, int(np.sum(truth == 1)), r, v, k_in, k_out, tried)
