"""GEM text embeddings end to end on the tiny model (configs/tiny-embedding.yaml): retrieval in
the records per party and pooled, the export loadable with plain transformers + PEFT, and
`fedtune embed` equal to what that plain model gives with GEM's pooling written out by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli

pytestmark = pytest.mark.xdist_group("embedding-runs")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    out = tmp_path_factory.mktemp("emb")
    cfg = load_config(ROOT / "configs" / "tiny-embedding.yaml", [f"output_dir={out}/run"])
    return run_federated(cfg, progress=False).run_dir


def test_records_hold_retrieval_per_party_and_pooled(run: Path):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    parties = {r["client"] for r in records if r["client"] is not None}
    assert parties == {"food", "history", "science"}
    final = [r for r in records if r["client"] is None][-1]
    assert final["round"] == 2
    for key in ("pooled_recall@1", "pooled_mrr", "pooled_ndcg@10", "pooled_knn_topic_acc", "mean_mrr", "worst_mrr"):
        assert 0.0 <= final[key] <= 1.0, key
    per = [r for r in records if r["round"] == 2 and r["client"] is not None]
    assert all("mrr" in r and "train_loss" in r for r in per)
    # the pooled test set is every party's test pairs together
    sizes = [r["retrieval_docs"] for r in per]
    assert final["pooled_retrieval_docs"] == sum(sizes) > max(sizes)
    # training moved the model: the pooled scores at round 0 and 2 differ
    first = [r for r in records if r["client"] is None][0]
    assert first["pooled_mrr"] != final["pooled_mrr"]
    # the cost: each round's bytes are its parties' payloads, and summary.json splits the time
    # (it held only the final record, and no round said its bytes up / down)
    for rnd in (1, 2):
        summary = next(r for r in records if r["client"] is None and r["round"] == rnd)
        mine = [r for r in records if r["client"] is not None and r["round"] == rnd]
        assert summary["bytes_up"] == sum(r["bytes_up"] for r in mine) > 0 and summary["failures"] == 0
        assert summary["bytes_down"] == sum(r["bytes_down"] for r in mine) > 0
    s = json.loads((run / "summary.json").read_text())
    assert s["cum_bytes"] == final["cum_bytes"] and s["setup_seconds"] > 0
    assert s["setup_seconds"] + s["round_seconds"] <= s["wall_seconds"]
    assert s["train_seconds"] + s["aggregate_seconds"] + s["eval_seconds"] <= s["round_seconds"]


def test_embed_equals_plain_transformers_and_peft(run: Path, tmp_path: Path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["what is the best food", "who won the battle of hastings"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    res = run_cli("embed", str(run), str(tmp_path / "texts.txt"), "--out", str(tmp_path / "v.npy"))
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "v.npy")

    # the documented recipe, by hand: base + PEFT adapter; the k GEM vectors after the text's
    # token embeddings; causal attention except that the GEM tokens do not see each other; mean
    # of their final hidden states
    adapter = run / "adapters" / "global"
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    gem = load_file(str(adapter / "gem_tokens.safetensors"))["tokens"]
    k = gem.shape[0]
    assert k == 2
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        emb = torch.cat([model.get_input_embeddings()(ids)[0], gem], 0)[None]
        t = emb.shape[1]
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))
        allowed[t - 1, t - 2] = False  # the second GEM token does not see the first
        mask = torch.zeros(1, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            hidden = model(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        expected = hidden[0, -k:].mean(0).numpy()
        np.testing.assert_allclose(got[i], expected, atol=1e-5)


def test_the_gem_tokens_travel_and_are_averaged_with_the_adapter(tmp_path: Path):
    """One round of FedAvg by hand: the run's exported GEM vectors are the example-weighted mean of
    what the parties trained (the same maths as the LoRA tensors), and they moved from the initial ones."""
    from safetensors.torch import load_file

    from fedtune.components import build_train_spec
    from fedtune.config import load_config
    from fedtune.embedding.gem import GEM_KEY, init_tokens
    from fedtune.embedding.parties import build_parties
    from fedtune.embedding.train import gem_state, local_gem_train_
    from fedtune.engines.federation import build_adapted_model
    from fedtune.models.load import load_tokenizer, resolve_model_dir
    from fedtune.recipes.federated import run_federated
    from fedtune.seeding import torch_generator
    from fedtune.strategies.fedavg import fedavg_aggregate
    from fedtune.types import ClientUpdate

    cfg = load_config(ROOT / "configs" / "tiny-embedding.yaml", ["rounds=1", f"output_dir={tmp_path}/one"])
    model_dir = resolve_model_dir(cfg.model, cfg.seed)
    tok = load_tokenizer(model_dir)
    parties = build_parties(cfg, tok, cfg.data.block_size - 2)
    model, _ = build_adapted_model(cfg, model_dir, {}, tok)
    tokens = torch.nn.Parameter(init_tokens(model, 2, torch_generator(cfg.seed, "gem-init")))
    start = gem_state(model, tokens)
    spec = build_train_spec(cfg)
    ups = []
    for cid, p in parties.items():
        delta, m = local_gem_train_(model, tokens, start, p.train, spec, 0.5, cfg.seed, 1, cid)
        assert delta[GEM_KEY].abs().sum() > 0  # the special tokens trained
        ups.append(ClientUpdate(cid, delta, len(p.train), m, 0, 0))
    new = fedavg_aggregate(start, ups)
    n = sum(u.num_examples for u in ups)
    expected = start[GEM_KEY] + sum(u.num_examples / n * u.delta[GEM_KEY] for u in ups)
    assert torch.allclose(new[GEM_KEY], expected, atol=1e-6)
    assert set(new) == set(start) and any(k.endswith("lora_B.weight") for k in new)
    run = run_federated(cfg, progress=False).run_dir
    exported = load_file(str(run / "adapters" / "global" / "gem_tokens.safetensors"))["tokens"]
    assert torch.allclose(exported, new[GEM_KEY], atol=1e-6)
    assert not torch.allclose(exported, start[GEM_KEY])


def test_embedding_runs_refuse_what_they_do_not_support():
    from fedtune.config import load_config
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(
            ROOT / "configs" / "tiny-embedding.yaml", ["strategy.name=fedkseed", "data.source=stdlib", "budget_mb=1"]
        )
    text = str(e.value)
    assert "strategy.name" in text and "data.source" in text and "budget_mb" in text


def test_an_interrupted_run_resumes_to_the_same_records(tmp_path: Path, interrupt_after, no_time):
    from fedtune.config import load_config
    from fedtune.recipes.federated import run_federated

    def cfg(name: str):
        over = [f"output_dir={tmp_path / name}", "evaluation.max_examples=4", "data.max_docs_per_label=12"]
        return load_config(ROOT / "configs" / "tiny-embedding.yaml", over)

    whole = run_federated(cfg("whole"), progress=False).records
    interrupt_after(cfg("cut"), 1)
    resumed = run_federated(cfg("cut"), resume=True, progress=False).records
    assert no_time(resumed) == no_time(whole)
