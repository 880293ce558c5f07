"""Recipe × accelerate launch config: combinations known not to work, rejected before any GPU is used.

`llamatune validate RECIPE --launch CONFIG` reads the accelerate config file (the presets live in
examples/accelerate/) and applies these rules; each problem says why and what to change.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llamatune.errors import RecipeError
from llamatune.schema import Recipe


def read_launch_config(path: Path) -> dict:
    """Loads an accelerate config file (YAML)."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError([f"--launch {path}: cannot read it as an accelerate config: {exc}"]) from None
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise RecipeError([f"--launch {path}: not an accelerate config (no distributed_type); see examples/accelerate/"])
    return config


def launch_problems(recipe: Recipe, config: dict) -> list[str]:
    """Returns one line per recipe/launch combination that cannot work."""
    kind = config.get("distributed_type")
    quant = recipe.quantization
    problems = []
    if kind == "FSDP" and quant.mode == "int8":
        problems.append("quantization.mode: int8 cannot be sharded by FSDP (bitsandbytes 8-bit weights are not "
                        "FSDP-wrappable); use nf4 with examples/accelerate/fsdp_qlora.yaml, or none")
    # auto resolves to bfloat16 when training does (precision auto picks bf16 on every GPU that has it).
    bf16 = {"bfloat16"} | ({"auto"} if recipe.train.precision in ("bf16", "auto") else set())
    if kind == "FSDP" and quant.mode == "nf4" and not {quant.compute_dtype, recipe.model.dtype} <= bf16:
        problems.append("FSDP over an nf4 base needs quantization.compute_dtype: bfloat16 and model.dtype: bfloat16, or "
                        f"auto with bf16 training (got {quant.compute_dtype} / {recipe.model.dtype}, train.precision "
                        f"{recipe.train.precision}): FSDP shards the packed 4-bit weights "
                        "only when they are stored in the same dtype as every other parameter")
    if kind == "FSDP" and quant.mode == "nf4" and (config.get("fsdp_config") or {}).get("fsdp_use_orig_params"):
        problems.append("FSDP + nf4 needs fsdp_use_orig_params: false in the launch config (see fsdp_qlora.yaml)")
    if kind == "DEEPSPEED" and (config.get("deepspeed_config") or {}).get("zero_stage") == 3 and quant.mode != "none":
        problems.append(f"quantization.mode: {quant.mode} with DeepSpeed ZeRO-3: ZeRO-3 partitions weights that "
                        "bitsandbytes has already packed; use quantization.mode: none, ZeRO-2, or fsdp_qlora.yaml")
    launch_precision = config.get("mixed_precision", "no")
    # llamatune autocasts bf16 itself and hands only fp16 (its loss scaler) to accelerate.
    wanted = "fp16" if recipe.train.precision == "fp16" else "no"
    if launch_precision not in ("no", None, wanted):
        problems.append(f"the launch config sets mixed_precision: {launch_precision} but train.precision is "
                        f"{recipe.train.precision}; set precision in the recipe and mixed_precision: \"no\" in the config")
    return problems
