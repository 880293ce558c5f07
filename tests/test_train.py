"""End to end on the tiny model: the run directory contract, plain-peft reload, loss math."""

import json
import pytest
import torch
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.train.loss import summed_loss
from llamatune.train.loop import train

RUN_FILES = {"recipe.yaml", "adapter", "tokenizer", "metrics.jsonl", "summary.json", "data_manifest.json", "loss.png"}


def test_cli_train_writes_exactly_the_run_directory(tiny_recipe):
    result = CliRunner().invoke(app, ["train", str(tiny_recipe)])
    assert result.exit_code == 0, result.output
    run = tiny_recipe.parent / "runs" / "tiny"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
    assert (run / "tokenizer" / "tokenizer_config.json").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] > 0 and summary["versions"]["torch"] == torch.__version__
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["vllm_lora"]["servable"] is True
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]
    assert [l["step"] for l in lines if "eval_loss" in l] == [0, 4]
    # the resolved recipe is self-sufficient: it loads again to the same recipe
    assert load_recipe(run / "recipe.yaml") == load_recipe(tiny_recipe)
    # not a terminal: plain progress lines instead of a live bar
    assert "step 4/4  loss " in result.output and " tok/s " in result.output
    last = result.output.strip().splitlines()[-1]
    assert "run directory" in last and "→" in last
    # a second run with the same name never overwrites the first
    again = CliRunner().invoke(app, ["train", str(tiny_recipe)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_saved_adapter_loads_with_plain_peft_and_matches(tiny_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(load_recipe(tiny_recipe), "tiny", run_dir=tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    base_ref = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_ref), adapter).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the adapter actually changed the model
    with torch.no_grad(), reloaded.disable_adapter():
        assert (reloaded(input_ids=ids).logits - got).abs().max() > 1e-4


def test_gradient_accumulation_equals_one_big_batch(tiny_recipe, tmp_path):
    """Token-weighted loss: 2 micro-batches of 4 with accumulation = 1 micro-batch of 8, same update."""
    def adapter_after(overrides, name):
        recipe = load_recipe(tiny_recipe, ["train.max_steps=1", "lora.dropout=0.0", *overrides])
        model = train(recipe, "tiny", run_dir=tmp_path / name).model
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    accumulated = adapter_after(["train.micro_batch_size=4", "train.grad_accum=2"], "a")
    one_batch = adapter_after(["train.micro_batch_size=8", "train.grad_accum=1"], "b")
    for name, value in one_batch.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6)


def test_summed_loss_matches_transformers_mean_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 8]])
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "position_ids": torch.arange(ids.shape[1])[None]}
    summed, n = summed_loss(model, batch)
    reference = model(input_ids=ids, labels=labels).loss
    assert n == 4
    torch.testing.assert_close(summed / n, reference)


@pytest.mark.parametrize("mode,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_base_trains_on_cpu(tiny_recipe, tmp_path, mode, layer):
    pytest.importorskip("bitsandbytes")
    recipe = load_recipe(tiny_recipe, [f"quantization.mode={mode}", "train.max_steps=2"])
    result = train(recipe, "tiny", run_dir=tmp_path / "q")
    assert type(result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]


@pytest.mark.parametrize("override,expected", [
    ("lora.alpah=3", "lora.alpah (--set): unknown key (did you mean 'alpha'?)"),
    ("train.micro_batch_size=four", "train.micro_batch_size (--set): Input should be a valid integer"),
    ("lora.dropout=1.5", "lora.dropout (--set): Input should be less than 1"),
    ("data.train=/nonexistent/train.jsonl", "data.train.0.path (--set): /nonexistent/train.jsonl: no such file or folder"),
])
def test_cli_recipe_errors_exit_2_with_dotted_path(tiny_recipe, override, expected):
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "--set", override])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not (tiny_recipe.parent / "runs").exists()  # nothing written for an invalid recipe


def test_runtime_problem_is_exit_1_with_message(tiny_recipe, tiny_model_dir, tmp_path):
    import shutil

    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "--set", f"model.path={no_template}"])
    assert result.exit_code == 1, result.output
    assert "has no chat template" in result.output and "Traceback" not in result.output


def test_packed_training_evaluates_the_same_and_trains(tiny_recipe, tmp_path):
    plain = train(load_recipe(tiny_recipe, ["train.max_steps=2", "data.packing=false"]), "tiny", run_dir=tmp_path / "plain").summary
    packed = train(load_recipe(tiny_recipe, ["train.max_steps=2", "data.packing=true"]), "tiny", run_dir=tmp_path / "packed").summary
    assert packed["data"]["train_rows"] < plain["data"]["train_rows"]
    assert abs(packed["eval_loss_before"] - plain["eval_loss_before"]) < 1e-5  # packing changes speed, not the loss
    assert packed["eval_loss_after"] < packed["eval_loss_before"]
    manifest = json.loads((tmp_path / "packed" / "data_manifest.json").read_text())
    assert [s["split"] for s in manifest["sources"]] == ["train", "eval"]
    assert all(len(f["sha256"]) == 64 for s in manifest["sources"] for f in s["files"])


def test_a_one_point_loss_curve_is_drawn_with_markers(tmp_path, monkeypatch):
    """A run with one logged step drew its train series as an invisible zero-length line."""
    from matplotlib.axes import Axes

    from llamatune.train.plot import write_loss_curve

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 1, "eval_loss": 2.4}\n')
    calls = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    assert write_loss_curve(tmp_path).read_bytes()[:4] == b"\x89PNG"
    assert calls[0]["label"] == "train" and calls[0]["marker"] == "o"
