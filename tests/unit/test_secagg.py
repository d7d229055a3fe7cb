"""Pairwise masks from X25519 key agreement cancel exactly in the sum; the server's view (every
masked upload, every public key, the run seed) does not reveal one client's update; a masked
upload rejected after masking aborts the round; non-sum strategies are refused."""

import pytest
import torch

from fedtune.secagg import FRAC, mask, new_private_key, public_key, to_fixed, unmask_sum

KEY = "m.lora_B.weight"
IDS = ["a", "b", "c", "d"]


def masked_round(mode: str, rnd: int = 2, seed: int = 5):
    g = torch.Generator().manual_seed(0)
    deltas = {c: {KEY: torch.randn(6, 3, generator=g)} for c in IDS}
    weights = {"a": 3.0, "b": 1.0, "c": 7.0, "d": 2.0}
    fixed = {c: to_fixed(deltas[c], weights[c]) for c in IDS}
    private = {c: new_private_key(mode, seed, rnd, c) for c in IDS}
    public = {c: public_key(private[c]) for c in IDS}  # what the server relays
    masked = {c: mask(fixed[c], c, private[c], public, rnd) for c in IDS}
    return deltas, weights, fixed, public, masked


@pytest.mark.parametrize("mode", ["secure", "seeded"])
def test_masks_cancel_exactly_in_the_sum(mode: str) -> None:
    deltas, weights, fixed, _, masked = masked_round(mode)
    exact = sum(fixed[c][KEY] for c in IDS)
    assert torch.equal(sum(masked[c][KEY] for c in IDS), exact)  # int64: bit-exact
    assert float((masked["a"][KEY] - fixed["a"][KEY]).abs().min()) > 2**40  # the mask dominates one upload
    want = sum(weights[c] * deltas[c][KEY] for c in IDS)
    got = unmask_sum(list(masked.values()))[KEY]
    assert float((got - want).abs().max()) <= len(IDS) / 2 ** (FRAC + 1) + 1e-6


def test_the_servers_view_does_not_reveal_one_update() -> None:
    """With secure randomness the server holds every masked upload, every public key and the run
    seed. Rebuilding a client's masks from the seed (what the landed code's masks were made of:
    derive_seed(seed, 'secagg', round, a, b)) or from the seeded key derivation gives nothing:
    the difference is still mask-sized. Two runs with the same seed mask differently."""
    from fedtune.seeding import derive_seed

    _, _, fixed, public, masked = masked_round("secure")
    shapes = {KEY: fixed["a"][KEY].shape}
    guesses = []
    for c in "bcd":  # the landed code's pair masks, from the seed alone
        lo, hi = sorted(("a", c))
        gen = torch.Generator().manual_seed(derive_seed(5, "secagg", 2, lo, hi))
        m = torch.randint(-(2**62), 2**62, shapes[KEY], generator=gen, dtype=torch.int64)
        guesses.append(m if "a" < c else -m)
    assert float((masked["a"][KEY] - sum(guesses) - fixed["a"][KEY]).abs().min()) > 2**40
    # the seeded key derivation, applied by a server that knows the seed, does not match either
    assert public_key(new_private_key("seeded", 5, 2, "a")) != public["a"]
    assert not torch.equal(masked["a"][KEY], masked_round("secure")[4]["a"][KEY])


def test_a_rejected_masked_upload_aborts_the_round_never_a_corrupted_sum(tiny_cfg, monkeypatch) -> None:
    """One masked upload is rejected after masking (here: the validation rejects client json's).
    The landed code summed the other three masked uploads (masks left in: entries around 5e11).
    Now the round is aborted: every upload is a recorded failure and the model is kept."""
    import fedtune.validation as validation
    from fedtune.recipes.federated import run_federated

    real = validation.update_problem
    monkeypatch.setattr(
        validation, "update_problem", lambda u, *a, **k: "test rejection" if u.client_id == "json" else real(u, *a, **k)
    )
    run = run_federated(tiny_cfg("rounds=1", "train.steps=1", "secure_aggregation=true"), progress=False)
    r1 = [r for r in run.records if r["round"] == 1]
    summary = next(r for r in r1 if r["client"] is None)
    base = next(r for r in run.records if r["round"] == 0 and r["client"] is None)
    failures = {r["client"]: r["failure"] for r in r1 if r["client"]}
    assert "test rejection" in failures.pop("json") and summary["failures"] == 4
    assert all("round aborted" in f for f in failures.values())
    assert summary["mean_ppl"] == pytest.approx(base["mean_ppl"], rel=1e-9)  # the model did not move


def test_secure_aggregation_is_refused_for_non_sum_strategies(tiny_cfg) -> None:
    from fedtune.errors import ConfigError

    for name in ("flora", "pcl", "robust"):
        with pytest.raises(ConfigError, match="secure_aggregation"):
            tiny_cfg("secure_aggregation=true", f"strategy.name={name}")
    # DP-FedAvg clips on the clients and works with secure aggregation, but not with adaptive
    # clipping, which needs each client's clipped bit in the clear
    tiny_cfg("secure_aggregation=true", "strategy.name=dp_fedavg")
    # an uplink codec cannot compress a masked share: it was silently not applied in-process
    for codec in ("quantize", "topk"):
        with pytest.raises(ConfigError, match="codec.name"):
            tiny_cfg("secure_aggregation=true", f"codec.name={codec}", "downlink_codec.name=identity")
    tiny_cfg("secure_aggregation=true", "downlink_codec.name=fp16")  # the downlink is not masked
    with pytest.raises(ConfigError, match="strategy.adaptive"):
        tiny_cfg("secure_aggregation=true", "strategy.name=dp_fedavg", "strategy.adaptive=true")


def test_secure_mode_writes_no_private_key_and_records_its_randomness(tiny_cfg) -> None:
    """privacy.randomness 'secure': the round's X25519 private keys stay in memory (the landed code
    wrote them into every client's state under RUN/clients/); the records name the mask randomness
    and that the clients' training loss was withheld (the masks would not hide it)."""
    from pathlib import Path

    from fedtune.recipes.federated import run_federated

    cfg = tiny_cfg("rounds=1", "train.steps=1", "secure_aggregation=true", "privacy.randomness=secure")
    run = run_federated(cfg, progress=False)
    files = sorted((Path(cfg.run_dir()) / "clients").rglob("round-*.pt"))
    assert len(files) == 4
    for f in files:
        raw = torch.load(f, weights_only=False)
        assert not raw.get("secagg_key"), f
        assert all(len(bytes(v)) != 32 for v in raw.values() if isinstance(v, (bytes, bytearray)))
    round0 = next(r for r in run.records if r["round"] == 0 and r["client"] is None)
    assert round0["secagg_randomness"].startswith("secure: mask keys from the OS CSPRNG")
    assert round0["client_metrics"].startswith("withheld") and round0["sampling_randomness"].startswith("secure")
    assert not any("train_loss" in r for r in run.records)
    last = next(r for r in run.records if r["round"] == 1 and r["client"] is None)
    assert last["failures"] == 0 and last["mean_ppl"] != round0["mean_ppl"]  # it trained and aggregated


def test_a_round_of_one_participant_never_uploads_its_update(tiny_cfg) -> None:
    """The sum of one update is that update: fixed-size samples of one are refused before any
    training, and a Poisson round that draws exactly one client (round 4 here, seed 0: 'http')
    is not run (a failure with the reason, nothing uploaded, the model kept). Before, that
    client's masked upload was its update in the clear (no pair to mask with)."""
    from fedtune.errors import ConfigError
    from fedtune.recipes.federated import run_federated

    with pytest.raises(ConfigError, match="sampling.fraction"):
        run_federated(tiny_cfg("secure_aggregation=true", "sampling.fraction=0.25", name="one"), progress=False)
    over = ("secure_aggregation=true", "sampling.scheme=poisson", "sampling.fraction=0.25", "rounds=4")
    run = run_federated(tiny_cfg(*over, "train.steps=1", name="poisson"), progress=False)
    four = [r for r in run.records if r["round"] == 4 and r["client"] is not None and r["sampled"]]
    assert [r["client"] for r in four] == ["http"]
    assert "2 participants" in four[0]["failure"] and not four[0].get("bytes_up")
    summary = {r["round"]: r for r in run.records if r["client"] is None}
    assert summary[4]["failures"] == 1 and summary[4]["mean_ppl"] == summary[3]["mean_ppl"]
    assert summary[4]["bytes_down"] == four[0]["bytes_down"] > 0  # the round's payload was sent, and counted
    assert summary[3]["failures"] == 0 and summary[3]["mean_ppl"] != summary[1]["mean_ppl"]  # two: it ran
