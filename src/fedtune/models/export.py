"""Export a run's adapters: PEFT format (global and/or one per client), or, for a mixture of
experts that PEFT cannot express, moe_adapter.safetensors + moe_config.json (load_moe_adapter)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedtune.adapters.moe_lora import is_moe, moe_info, save_moe_adapter
from fedtune.models.adapters import export_peft
from fedtune.types import AdapterState


def export_adapters(
    run_dir: Path,
    fed: Any,
    global_state: AdapterState | None,
    personal: Mapping[str, AdapterState] | None,
    private_of: Callable[[str], AdapterState | None],
    experts: Mapping[str, int],
    client_private: bool = False,
) -> list[str]:
    """adapters/global (if there is a global model) and adapters/<client> (personal models, with
    the tensors each client kept privately). A personal model whose private tensors stay on the
    client (Flower) is not exported by the server: returns those clients."""
    model_dir = fed.model_dir
    base = str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir

    def write(state: AdapterState, name: str, cid: str | None) -> None:
        out = run_dir / "adapters" / name.replace("/", "_")
        if is_moe(fed.model):
            info = {**moe_info(fed.model), "base_model_name_or_path": base}
            info["client_experts"] = experts.get(cid) if cid else None
            save_moe_adapter(state, info, out)
        else:
            export_peft(state, fed.adapter_cfg, base, out)

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
