"""Can vLLM serve this adapter as-is (multi-LoRA), or must it be merged first?

vLLM serves plain LoRA on the projection layers; it does not apply DoRA's magnitude vectors or
peft's `modules_to_save` copies. Adapters above rank 16 need vLLM's --max-lora-rank raised.
"""

from __future__ import annotations

import json
from pathlib import Path

_SERVABLE_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
_VLLM_DEFAULT_MAX_RANK = 16


def vllm_lora_check(adapter_dir: Path) -> dict:
    """Returns {"servable": bool, "notes": [...]} for a peft adapter folder."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    notes, servable = [], True
    if config.get("use_dora"):
        servable = False
        notes.append("DoRA adapter: vLLM serves plain LoRA only; serve the merged model (llamatune merge)")
    if config.get("modules_to_save"):
        servable = False
        notes.append(f"modules_to_save {config['modules_to_save']}: vLLM does not load them; merge instead")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    # peft may store full module paths (model.layers.0.self_attn.q_proj): the layer kind is the last part
    odd = sorted({t.rsplit(".", 1)[-1] for t in targets} - _SERVABLE_TARGETS)
    if odd:
        servable = False
        notes.append(f"target modules {odd} are not LoRA-servable by vLLM for Llama models; merge instead")
    if servable and config.get("r", 0) > _VLLM_DEFAULT_MAX_RANK:
        notes.append(f"rank {config['r']} > {_VLLM_DEFAULT_MAX_RANK}: start vLLM with --max-lora-rank {config['r']} or higher")
    if servable:
        notes.append("servable as-is: vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER_DIR")
    return {"servable": servable, "notes": notes}
