"""The prompt-learning kinds. Prompt tuning (adapters/prompt_tuning.py): the defining identity
against the base model fed the prompt as real tokens; prefix tuning (adapters/prefix_tuning.py):
against the base model's own keys and values of real tokens put before the input. For both: every
caller's frame (left padding with positions and a cache, indexed logits, labels, greedy
generation), the PEFT export round trip, the parameter count, no merge."""

import pytest
import torch

from fedtune.adapters import adapter_of, build_adapter
from fedtune.adapters.base import InjectContext
from fedtune.config.adapters import PrefixTuningAdapterConfig, PromptTuningAdapterConfig
from fedtune.config.schema import ModelConfig, TinyModelConfig
from fedtune.models.adapters import get_state, set_state_, trainable_parameter_count
from fedtune.models.load import load_model, model_type, tiny_dir

PROMPT = [5, 77, 123]  # real tokens whose embeddings become the virtual tokens: the hand reference


def tiny(arch: str = "llama") -> tuple[ModelConfig, str]:
    mcfg = ModelConfig(name="tiny", tiny=TinyModelConfig(arch=arch))
    return mcfg, str(tiny_dir(mcfg, seed=0))


def prompted(arch: str = "llama") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the prompt-tuned model with P = E(PROMPT), the bare base model)."""
    mcfg, d = tiny(arch)
    model = build_adapter(PromptTuningAdapterConfig(num_virtual_tokens=len(PROMPT))).inject(
        load_model(d, mcfg), InjectContext(seed=0, model_type=model_type(d))
    )
    base = load_model(d, mcfg)
    set_state_(model, {"prompt_embeddings": base.get_input_embeddings()(torch.tensor(PROMPT)).detach()})
    return model.eval(), base.eval()


PREFIX = PROMPT  # for prefix tuning: the tokens whose keys and values become the prefixes


def table_of(base: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """The base model's cached keys and values of `tokens` (positions 0..n-1) in PEFT's layout:
    one row per token of [layers x (key, value) x kv heads x head dim]."""
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values
    rows = []
    for layer in cache.layers:  # keys / values [1, kv heads, n, head dim]
        rows += [layer.keys[0].permute(1, 0, 2), layer.values[0].permute(1, 0, 2)]
    return torch.stack(rows, dim=1).reshape(len(tokens), -1)


def prefixed() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the prefix-tuned model with the prefixes = the base's keys and values of PREFIX, the base)."""
    mcfg, d = tiny()
    model = build_adapter(PrefixTuningAdapterConfig(num_virtual_tokens=len(PREFIX))).inject(
        load_model(d, mcfg), InjectContext(seed=0, model_type=model_type(d))
    )
    base = load_model(d, mcfg).eval()
    set_state_(model, {"prompt_embeddings": table_of(base, PREFIX)})
    return model.eval(), base


MADE = {"prompt_tuning": prompted, "prefix_tuning": prefixed}
# PeftModel returns prompt tuning's virtual positions first; prefix tuning adds none
PEFT_CUT = {"prompt_tuning": len(PROMPT), "prefix_tuning": 0}


def ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 250, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_prompt_acts_as_tokens_put_before_the_input(arch: str) -> None:
    """P = E(t): the model's logits on x are the base model's on [t, x] without t's positions;
    `logits_to_keep` indices and labels stay in the caller's frame (labels: PEFT's loss, where
    the virtual tokens' labels are -100 and the last of them predicts x_1)."""
    model, base = prompted(arch)
    x = ids(2, 10)
    full = torch.cat([torch.tensor([PROMPT] * 2), x], dim=1)
    with torch.no_grad():
        on_full = base(input_ids=full).logits
        ref = on_full[:, len(PROMPT) :]
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)  # positional input_ids
        cols = torch.tensor([2, 5, 9])
        if arch == "llama":  # Llama takes index tensors in logits_to_keep (client/train.py uses them)
            torch.testing.assert_close(model(input_ids=x, logits_to_keep=cols).logits, ref[:, cols])
        loss = model(input_ids=x, labels=x).loss  # as PeftModel: the last virtual token predicts x_1 too
        want = torch.nn.functional.cross_entropy(on_full[:, len(PROMPT) - 1 : -1].flatten(0, 1), x.flatten())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MADE))
def test_left_padded_option_scores_equal_one_example_at_a_time(kind: str) -> None:
    """`option_logprobs` batches left-padded prompts with positions and scores options on a repeated
    cache: with a prompt (prefixes), the batched scores equal the one-at-a-time ones and the base
    model's on [t, prompt] (PeftModel drops position_ids, so it cannot do this)."""
    from fedtune.evaluation.tasks import option_logprobs

    model, base = MADE[kind]()
    prompts = [ids(1, 4, 1)[0].tolist(), ids(1, 9, 2)[0].tolist()]
    options = [[[7, 8, 9], [10]], [[11, 12], [13, 14, 15, 16]]]
    batched = option_logprobs(model, prompts, options, bf16=False, batch_size=2)
    single = [option_logprobs(model, [p], [o], bf16=False, batch_size=1)[0] for p, o in zip(prompts, options)]
    on_base = option_logprobs(base, [PROMPT + p for p in prompts], options, bf16=False, batch_size=1)
    for b, s, r in zip(batched, single, on_base):
        assert b == pytest.approx(s, abs=1e-4) and b == pytest.approx(r, abs=1e-4)


@pytest.mark.parametrize("kind", sorted(MADE))
def test_export_loads_with_peft_and_generates_the_same_answer(tmp_path, kind: str) -> None:
    from peft import PeftModel

    from fedtune.evaluation.tasks import generate
    from fedtune.models.load import byte_tokenizer

    model, _ = MADE[kind]()
    g = torch.Generator().manual_seed(1)
    set_state_(model, {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in get_state(model).items()})
    mcfg, d = tiny()
    out = adapter_of(model).export(model, get_state(model), tmp_path / "adapter", d, None, None)
    loaded = PeftModel.from_pretrained(load_model(d, mcfg), str(out)).eval()
    x = ids(2, 12)
    with torch.no_grad():
        ours, theirs = model(input_ids=x).logits, loaded(input_ids=x).logits[:, PEFT_CUT[kind] :]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    tok = byte_tokenizer()
    prompt = x[0, :6].tolist()
    assert generate(model, tok, prompt, 8, False) == generate(loaded, tok, prompt, 8, False)


def test_trainable_parameters_are_the_virtual_tokens_only() -> None:
    model, _ = prompted()
    assert trainable_parameter_count(model) == len(PROMPT) * 64  # n x hidden of the tiny Llama
    assert sorted(get_state(model)) == ["prompt_embeddings"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fedtune_prompt_encoder.embedding.weight"]


def test_a_prompt_has_no_merged_model(tmp_path) -> None:
    from fedtune.errors import FedtuneError
    from fedtune.models.export import export_merged

    model, _ = prompted()
    _, d = tiny()
    adapter_of(model).export(model, get_state(model), tmp_path / "adapters" / "global", d, None, None)
    with pytest.raises(FedtuneError, match="PROMPT_TUNING adapter: virtual tokens, not a weight offset"):
        export_merged(tmp_path)


def test_a_caller_with_its_own_4d_mask_is_told_the_kind() -> None:
    from fedtune.errors import FedtuneError

    model, _ = prompted()
    with pytest.raises(FedtuneError, match="'prompt_tuning' takes a 2-D attention mask"):
        model(input_ids=ids(1, 4), attention_mask=torch.ones(1, 1, 4, 4))


def test_the_prefixes_act_as_the_keys_and_values_of_tokens_put_before_the_input() -> None:
    """Prefixes = the base's keys and values of t: the model's logits on x are the base model's on
    [t, x] at x's positions; labels stay in the caller's frame (no prefix position predicts)."""
    model, base = prefixed()
    x = ids(2, 10)
    full = torch.cat([torch.tensor([PREFIX] * 2), x], dim=1)
    with torch.no_grad():
        ref = base(input_ids=full).logits[:, len(PREFIX) :]
        torch.testing.assert_close(model(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)  # positional input_ids
        loss = model(input_ids=x, labels=x).loss
        want = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_only_the_prefixes_train_and_their_gradient_is_not_zero() -> None:
    model, _ = prefixed()
    model.train()
    model(input_ids=ids(2, 8), labels=ids(2, 8)).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["fedtune_prefix_encoder.embedding.weight"]
    assert float(trainable[0][1].grad.abs().sum()) > 0
    # n x layers x (key, value) x kv heads x head dim of the tiny Llama: 3 x 2 x 2 x 2 x 16
    assert trainable_parameter_count(model) == len(PREFIX) * 2 * 2 * 32
    assert sorted(get_state(model)) == ["prompt_embeddings"]


def test_a_prefix_has_no_merged_model_and_a_4d_mask_is_told_the_kind(tmp_path) -> None:
    from fedtune.errors import FedtuneError
    from fedtune.models.export import export_merged

    model, _ = prefixed()
    _, d = tiny()
    adapter_of(model).export(model, get_state(model), tmp_path / "adapters" / "global", d, None, None)
    with pytest.raises(FedtuneError, match="PREFIX_TUNING adapter"):
        export_merged(tmp_path)
    with pytest.raises(FedtuneError, match="'prefix_tuning' takes a 2-D attention mask"):
        model(input_ids=ids(1, 4), attention_mask=torch.ones(1, 1, 4, 4))
