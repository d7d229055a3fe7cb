"""Trust-weighted distillation against FedAvg and local training, on the demo's instruction task.

    .venv/bin/python bench/distill.py                                    # SmolLM2, four parties (hours on 2 CPU cores)
    .venv/bin/python bench/distill.py --config configs/tiny-trust-distill.yaml --out bench/out/distill-tiny

Rows, the same rounds, steps and learning rate for every method (the config's):
- `local`: each party trains its own adapter on the shared base, nothing moves;
- `fedavg`: one shared adapter (every party the same architecture, as FedAvg needs);
- `trust_distill same`: each party its own adapter on the run's model, top-k predictions on the
  public corpus exchanged, trust-weighted pseudo-labels back;
- `trust_distill mixed`: the parties of `--parties` (other depths, and a party whose model is
  random: the bad party the trust weights should ignore). FedAvg cannot run this row at all.

Reported per row (last round): mean and worst own-test accuracy (instruction data) or perplexity
of the honest parties, the same on the out-of-distribution split (`evaluation.ood`: the demo's
class-balanced test of all parties, which a label-skewed party mostly has not seen), per party too
(every party but those with `"init": "random"`), MB moved (the real payloads), the trust the
honest parties give the random party (mean of their trust rows), and seconds of the rounds. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runs import run_rows

# four parties on the demo (SmolLM2-135M-Instruct has 30 layers): two full, one half depth, one random
DEMO_PARTIES = '[{}, {}, {"layers": 15}, {"init": "random"}]'


def last_round(result: dict[str, Any]) -> list[dict[str, Any]]:
    recs = result["records"]
    last = max(r["round"] for r in recs)
    return [r for r in recs if r["round"] == last and r["client"]]


def row_numbers(result: dict[str, Any], bad: set[str]) -> dict[str, Any]:
    """The honest parties' final quality, bytes, and the trust they give the bad parties."""
    recs = last_round(result)
    honest = [r for r in recs if r["client"] not in bad]
    key = "test_acc" if all("test_acc" in r for r in honest) else "test_ppl"
    vals = [r[key] for r in honest]
    trust = [v for r in honest for c, v in (r.get("trust") or {}).items() if c in bad]
    ood_key = key.replace("test_", "ood_")
    ood = [r[ood_key] for r in honest if ood_key in r]
    final = result["summary"]["final"]
    return {
        "metric": key,
        "mean": sum(vals) / len(vals),
        "worst": min(vals) if key == "test_acc" else max(vals),
        "ood_mean": sum(ood) / len(ood) if ood else None,
        "ood_worst": (min(ood) if key == "test_acc" else max(ood)) if ood else None,
        "per_party": {r["client"]: {"own": r[key], "ood": r.get(ood_key)} for r in honest},
        "mb": (final.get("cum_bytes") or 0) / 1e6,
        "trust_in_bad": sum(trust) / len(trust) if trust else None,
        "rounds_s": result["summary"].get("round_seconds"),
    }


def main() -> None:
    from fedtune.config.load import read_yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="bench/out/distill")
    ap.add_argument("--parties", default=None, help="JSON list for the mixed row (default: the config's or the demo's)")
    ap.add_argument("--public-blocks", type=int, default=8)
    a = ap.parse_args()
    # each row replaces the whole strategy block; trust_distill keeps the config's own settings
    own = dict(read_yaml(a.config).get("strategy") or {})
    td = {k: v for k, v in own.items() if k != "parties"} if own.get("name") == "trust_distill" else {}
    td.update(name="trust_distill", public_blocks=a.public_blocks)
    parties = a.parties or (json.dumps(own["parties"]) if own.get("parties") else DEMO_PARTIES)
    rows = {
        "local": ['strategy={"name": "local"}'],
        "fedavg": ['strategy={"name": "fedavg"}'],
        "trust_distill same": [f"strategy={json.dumps(td)}"],
        "trust_distill mixed": [f"strategy={json.dumps({**td, 'parties': json.loads(parties)})}"],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run_rows(rows, a.config, [], out)
    clients = sorted({r["client"] for r in last_round(res["local"])})
    spec = json.loads(parties)
    bad = {c for c, p in zip(clients, spec) if p.get("init") == "random"}
    table = {row: row_numbers(r, bad if row.endswith("mixed") else set()) for row, r in res.items()}
    metric = table["local"]["metric"]
    lines = [
        f"Config {a.config}; mixed parties {parties} (bad: {', '.join(sorted(bad)) or 'none'}); "
        f"honest parties' last-round own-test {metric}.",
        "",
        f"| row | mean {metric} | worst {metric} | mean ood | worst ood | MB moved | x FedAvg bytes "
        "| trust in the bad party | rounds s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fed_mb = table["fedavg"]["mb"] or float("nan")

    def fmt(x: float | None) -> str:
        if x is None:
            return "-"
        return f"{100 * x:.1f} %" if metric == "test_acc" else f"{x:.2f}"

    for row, t in table.items():
        trust = "-" if t["trust_in_bad"] is None else f"{t['trust_in_bad']:.3f}"
        lines.append(
            f"| {row} | {fmt(t['mean'])} | {fmt(t['worst'])} | {fmt(t['ood_mean'])} | {fmt(t['ood_worst'])} "
            f"| {t['mb']:.2f} | {t['mb'] / fed_mb:.3f} | {trust} | {t['rounds_s'] or 0:.0f} |"
        )
    lines += ["", f"Per honest party, own test / out-of-distribution test ({metric}):", ""]
    parties_seen = sorted({c for t in table.values() for c in t["per_party"]})
    lines += ["| row | " + " | ".join(parties_seen) + " |", "|---" * (len(parties_seen) + 1) + "|"]
    for row, t in table.items():
        cells = [t["per_party"].get(c) for c in parties_seen]
        text = ["-" if x is None else f"{fmt(x['own'])} / {fmt(x['ood'])}" for x in cells]
        lines.append(f"| {row} | " + " | ".join(text) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
