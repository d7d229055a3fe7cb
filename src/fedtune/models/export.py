"""Export a run's adapters, each kind its own way (`Adapter.export`): PEFT format (global and/or
one per client), or, for a mixture of experts that PEFT cannot express, moe_adapter.safetensors
+ moe_config.json (load_moe_adapter)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedtune.adapters import adapter_of
from fedtune.errors import Problem
from fedtune.types import AdapterState


def export_adapters(
    run_dir: Path,
    fed: Any,
    global_state: AdapterState | None,
    personal: Mapping[str, AdapterState] | None,
    private_of: Callable[[str], AdapterState | None],
    variants: Mapping[str, int],
    client_private: bool = False,
) -> list[str]:
    """adapters/global (if there is a global model) and adapters/<client> (personal models, with
    the tensors each client kept privately). A personal model whose private tensors stay on the
    client (Flower) is not exported by the server: returns those clients."""
    model_dir = fed.model_dir
    base = str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir

    def write(state: AdapterState, name: str, cid: str | None) -> None:
        out = run_dir / "adapters" / adapter_folder(name)
        variant = variants.get(cid) if cid else None
        adapter_of(fed.model).export(fed.model, state, out, base, fed.adapter_cfg, variant)

    if global_state is not None:
        write(global_state, "global", None)
    kept = []
    for cid, state in (personal or {}).items():
        private = private_of(cid)
        if client_private and private is None:
            kept.append(cid)
            continue
        write({**state, **(private or {})}, cid, cid)
    return kept


def exported_adapter(run_dir: Path, client: str | None = None) -> Path:
    """The PEFT adapter a run exported: adapters/global, or adapters/<client> (a personal model)."""
    from fedtune.errors import FedtuneError

    root = Path(run_dir) / "adapters"
    name = adapter_folder(client or "global")
    out = root / name
    if not (out / "adapter_config.json").exists():
        have = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").exists()) if root.exists() else []
        raise FedtuneError(
            f"{out} holds no PEFT adapter; this run exported: {', '.join(have) or 'none'} "
            "(only PEFT's own kinds export in PEFT format: MoE-LoRA and S'MoRE write moe_adapter / smore_adapter "
            "safetensors, which PEFT cannot load or merge)"
        )
    return out


def load_exported(run_dir: Path, client: str | None = None) -> tuple[Any, Any]:
    """(model with the run's adapter, tokenizer), loaded with plain transformers + PEFT."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    adapter = exported_adapter(run_dir, client)
    base_dir = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, adapter).eval(), AutoTokenizer.from_pretrained(base_dir)


def export_merged(run_dir: Path, client: str | None = None) -> Path:
    """merged/<global|client>: the base model with the adapter merged in (`merge_and_unload`), a
    plain model dir loadable with AutoModelForCausalLM.from_pretrained; written atomically."""
    import os

    from fedtune.errors import FedtuneError
    from fedtune.files import temp_dir

    model, tokenizer = load_exported(run_dir, client)
    if model.active_peft_config.is_prompt_learning:
        raise FedtuneError(
            f"{exported_adapter(run_dir, client)} is a {model.active_peft_config.peft_type.value} adapter: "
            "virtual tokens, not a weight offset, so there is nothing to merge; load it with "
            "PeftModel.from_pretrained (or `fedtune export` without --merged)"
        )
    target = Path(run_dir) / "merged" / (client or "global").replace("/", "_")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, ".merge-")
    model.merge_and_unload().save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def reply(run_dir: Path, prompt: str, client: str | None = None, max_new_tokens: int = 64) -> str:
    """The greedy answer of a run's global (or a client's personal) model to one user message,
    through the model's chat template."""
    from fedtune.data.chat import Renderer
    from fedtune.evaluation.tasks import generate

    model, tokenizer = load_exported(run_dir, client)
    r = Renderer(tokenizer)
    return generate(model, tokenizer, r.ids(r.text([{"role": "user", "content": prompt}], True)), max_new_tokens, False)


def adapter_folder(name: str) -> str:
    """The folder under RUN/adapters of the global model ('global') or of a client's own model."""
    return name.replace("/", "_")


def folder_problems(client_ids: list[str]) -> list[Problem]:
    """Client ids whose exported adapters would share a folder: 'global' (the global model's), or
    two ids that differ only by '/' and '_'."""
    out: list[Problem] = []
    folders: dict[str, str] = {}  # folder -> the client id that has it
    for cid in client_ids:
        name = adapter_folder(cid)
        if name == "global" or name in folders:
            clash = "the global model's" if name == "global" else f"client {folders[name]!r}'s"
            out.append(
                Problem(
                    "client id",
                    cid,
                    f"its adapter folder adapters/{name} would be {clash}",
                    "rename that client's folder or label",
                )
            )
        folders[name] = cid
    return out
