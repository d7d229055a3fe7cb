"""One-run privacy auditing (Steinke, Nasr, Jagielski 2023, arXiv:2305.08846): the bound against
hand computations, its validity on a mechanism of known epsilon, and the canaries' placement."""

import math
import stat

import numpy as np
import pytest
import torch

from fedtune.privacy.audit import audit, default_guess_counts, epsilon_lower_bound, guesses, p_value

pytest.importorskip("scipy", reason="the audit's binomial tails need scipy (the dp extra)")


def _solve(p, target: float) -> float:
    """The largest eps in [0, 50] with p(eps) <= target, by bisection (p increasing)."""
    lo, hi = 0.0, 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p(mid) <= target else (lo, mid)
    return lo


def _q(eps: float) -> float:
    return math.exp(eps) / (1 + math.exp(eps))


def test_pure_dp_bound_matches_the_binomial_tail_by_hand() -> None:
    # all r guesses correct: P[B >= r] = q^r <= alpha  <=>  eps <= logit(alpha^(1/r))
    for r, alpha in [(10, 0.05), (64, 0.05 / 3), (100, 0.05)]:
        q = alpha ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, alpha) == pytest.approx(math.log(q / (1 - q)), abs=1e-8)
    assert epsilon_lower_bound(10, 10, 10, 0.0, 0.05) == pytest.approx(1.0518732, abs=1e-6)
    # one wrong guess of 20: P[B >= 19] = 20 q^19 (1 - q) + q^20
    by_hand = _solve(lambda e: 20 * _q(e) ** 19 * (1 - _q(e)) + _q(e) ** 20, 0.05)
    assert epsilon_lower_bound(20, 20, 19, 0.0, 0.05) == pytest.approx(by_hand, abs=1e-8)
    assert p_value(20, 20, 19, 1.0, 0.0) == pytest.approx(20 * _q(1) ** 19 * (1 - _q(1)) + _q(1) ** 20, rel=1e-12)


def test_delta_term_matches_theorem_3_by_hand() -> None:
    # m = 10, r = v = 2: P[W >= 2] <= q^2 + 2 m delta max(P[B = 1] / 1, P[0 <= B < 2] / 2)
    m, delta = 10, 0.01

    def p(e: float) -> float:
        q = _q(e)
        return q**2 + 2 * m * delta * max(2 * q * (1 - q), (1 - q**2) / 2)

    for e in (0.0, 0.3, 1.0, 3.0):
        assert p_value(m, 2, 2, e, delta) == pytest.approx(p(e), rel=1e-12)
    assert epsilon_lower_bound(m, 2, 2, delta, 0.5) == pytest.approx(_solve(p, 0.5), abs=1e-8)
    # delta only weakens the bound; no correct guess never rejects anything
    assert epsilon_lower_bound(64, 64, 60, 1e-3, 0.05) < epsilon_lower_bound(64, 64, 60, 0.0, 0.05)
    assert epsilon_lower_bound(64, 64, 32, 0.0, 0.05) == 0.0


def test_bound_is_valid_on_randomized_response_of_known_epsilon() -> None:
    # eps0-DP randomized response reports each bit correctly w.p. e^eps0 / (1 + e^eps0): at 95 %
    # confidence the lower bound exceeds eps0 in at most ~5 % of runs, and it detects leakage.
    eps0, m, trials = 1.0, 200, 200
    rng = np.random.default_rng(0)
    lows = []
    for _ in range(trials):
        s = rng.random(m) < 0.5
        seen = np.where(rng.random(m) < _q(eps0), s, ~s)
        lows.append(audit(np.where(seen, -1.0, 1.0) + rng.random(m) * 1e-3, s, 0.0, 0.95, [m]).epsilon_lower)
    assert sum(x > eps0 for x in lows) <= 0.05 * trials + 1
    assert np.median(lows) > 0.3


def test_guesses_in_for_lowest_out_for_highest_rest_abstain() -> None:
    t = guesses([0.5, -2.0, 3.0, 0.1, -1.0], k_in=2, k_out=1)
    assert t.tolist() == [0, 1, -1, 0, 1]
    with pytest.raises(ValueError):
        guesses([0.0, 1.0], 2, 1)


def test_audit_takes_the_best_guess_count_with_bonferroni() -> None:
    m = 64
    included = [i % 2 == 0 for i in range(m)]
    perfect = [-1.0 - i if inc else 1.0 + i for i, inc in enumerate(included)]
    res = audit(perfect, included, 0.0, 0.95)
    assert default_guess_counts(m) == [16, 32, 64] and len(res.tried) == 3
    assert (res.guesses, res.correct, res.guesses_in, res.guesses_out) == (64, 64, 32, 32)
    q = (0.05 / 3) ** (1 / 64)
    assert res.epsilon_lower == pytest.approx(math.log(q / (1 - q)), abs=1e-8)
    assert res.included == 32 and res.to_dict()["canaries"] == m
    shuffled = audit(list(np.random.default_rng(1).random(m)), included, 0.0, 0.95)
    assert shuffled.epsilon_lower == 0.0


def test_canaries_are_seeded_half_included_and_kept_private(tmp_path) -> None:
    from fedtune.data.canaries import SECRET, Canaries, make_canaries, run_canaries

    a = make_canaries(7, 200, 16, [3, 5, 9], ["c0", "c1"])
    b = make_canaries(7, 200, 16, [3, 5, 9], ["c0", "c1"])
    assert torch.equal(a.tokens, b.tokens) and a.included == b.included
    assert set(a.tokens.unique().tolist()) == {3, 5, 9} and a.tokens.shape == (200, 16)
    assert 70 < sum(a.included) < 130 and a.clients[:3] == ("c0", "c1", "c0")
    blocks = a.train_blocks()
    assert sum(x.shape[0] for x in blocks.values()) == sum(a.included)
    first = next(i for i, (c, inc) in enumerate(zip(a.clients, a.included)) if inc and c == "c0")
    assert torch.equal(blocks["c0"][0], a.tokens[first])

    run = run_canaries(tmp_path, 32, 1, None, 8, list(range(10)), ["x", "y", "z"])  # a secret seed
    assert stat.S_IMODE((tmp_path / SECRET).stat().st_mode) == 0o600
    again = run_canaries(tmp_path, 32, 1, None, 8, list(range(10)), ["x", "y", "z"])
    assert Canaries.from_json((tmp_path / SECRET).read_text()).seed == run.seed
    assert torch.equal(again.tokens, run.tokens) and again.included == run.included
    assert len(set(run.clients)) == 1


def test_canary_clients_are_checked() -> None:
    from fedtune.data.canaries import canary_clients
    from fedtune.errors import ConfigError

    assert canary_clients(["b"], ["a", "b"], 0) == ["b"]
    assert len(canary_clients(2, ["a", "b", "c"], 0)) == 2
    with pytest.raises(ConfigError, match="unknown client ids"):
        canary_clients(["nope"], ["a", "b"], 0)
    with pytest.raises(ConfigError, match="more than the 2 clients"):
        canary_clients(3, ["a", "b"], 0)


def test_canary_blocks_join_the_training_split_only() -> None:
    from fedtune.config.schema import DataConfig
    from fedtune.data.blocks import Corpus, Shard
    from fedtune.data.canaries import add_train_blocks
    from fedtune.data.shards import ClientShards
    from fedtune.models.load import byte_tokenizer

    extra = torch.full((3, 32), 7, dtype=torch.long)
    texts = [f"document {i} " * 30 for i in range(12)]
    docs, corpus = {"a": list(range(6)), "b": list(range(6, 12))}, Corpus(texts, [0] * 12)
    plain = ClientShards(docs, corpus, byte_tokenizer(), DataConfig(block_size=32, max_train_blocks=4), seed=0)
    shards = ClientShards(
        docs, corpus, byte_tokenizer(), DataConfig(block_size=32, max_train_blocks=4), 0, extra_train={"a": extra}
    )
    assert shards["a"].train.shape[0] == plain["a"].train.shape[0] + 3  # not cut by max_train_blocks
    assert torch.equal(shards["a"].train[-3:], extra) and torch.equal(shards["a"].test, plain["a"].test)
    assert torch.equal(shards["b"].train, plain["b"].train)
    # DP-SGD unit 'document': each canary is a document of its own, every token a target
    s = Shard("c", extra[:2], extra[:0], extra[:0], 1, train_doc=torch.tensor([0, 0]), train_mask=extra[:2] > 0)
    out = add_train_blocks(s, extra)
    assert out.train_doc is not None and out.train_doc.tolist() == [0, 0, 1, 2, 3]
    assert out.train_mask is not None and bool(out.train_mask[2:].all())


def test_audit_config_is_off_by_default_and_in_process_only(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    assert tiny_cfg().audit is None
    cfg = tiny_cfg("audit.canaries=16", "audit.clients=[json]")
    assert cfg.audit is not None and cfg.audit.clients == ["json"] and cfg.audit.seed is None
    with pytest.raises(ConfigError, match="in-process engine"):
        tiny_cfg("audit.canaries=16", "engine.name=flower-sim")
