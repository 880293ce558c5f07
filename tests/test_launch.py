"""Accelerate presets parse, and validate --launch rejects combinations known not to work."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamatune.cli import app

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "examples" / "accelerate").glob("*.yaml"))
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_are_accelerate_configs_and_accept_a_plain_recipe(preset):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(preset))
    assert config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    result = CliRunner().invoke(app, ["validate", QUICKSTART, "--launch", str(preset)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("preset,overrides,expected", [
    ("fsdp.yaml", ["quantization.mode=int8"], "int8 cannot be sharded by FSDP"),
    ("fsdp_qlora.yaml", ["quantization.mode=nf4", "quantization.compute_dtype=float32"],
     "needs quantization.compute_dtype: bfloat16 and model.dtype: bfloat16"),
    ("fsdp_qlora.yaml", ["quantization.mode=nf4", "train.precision=fp32"], "auto with bf16 training"),
    ("fsdp.yaml", ["quantization.mode=nf4", "quantization.compute_dtype=bfloat16", "model.dtype=bfloat16"], "fsdp_use_orig_params: false"),
    ("deepspeed_zero3.yaml", ["quantization.mode=nf4"], "with DeepSpeed ZeRO-3"),
])
def test_known_bad_combinations_are_rejected_with_the_reason(preset, overrides, expected):
    args = ["validate", QUICKSTART, "--launch", str(REPO / "examples" / "accelerate" / preset)]
    result = CliRunner().invoke(app, args + [a for o in overrides for a in ("--set", o)])
    assert result.exit_code == 2 and expected in result.output, result.output


@pytest.mark.parametrize("ok", [
    ["quantization.mode=nf4", "quantization.compute_dtype=bfloat16", "model.dtype=bfloat16"],
    ["quantization.mode=nf4"],  # auto dtypes with precision auto: bf16 on the GPUs FSDP runs on
])
def test_fsdp_qlora_with_bf16_is_accepted(ok):
    args = ["validate", QUICKSTART, "--launch", str(REPO / "examples" / "accelerate" / "fsdp_qlora.yaml")]
    result = CliRunner().invoke(app, args + [a for o in ok for a in ("--set", o)])
    assert result.exit_code == 0, result.output
