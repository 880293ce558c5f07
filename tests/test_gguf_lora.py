"""`llamatune export RUN --format gguf-lora | gguf-base | ollama-lora`, proven in llama.cpp itself: the base GGUF plus
the adapter GGUF give the logits of the merged model (its GGUF in llama.cpp, and transformers), for plain LoRA,
rsLoRA and per-module rank/alpha patterns; what llama.cpp cannot apply is refused with the way out."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llamatune.cli import app

NEEDS_LLAMA_CPP = "llama-cpp-python not installed: pip install -e '.[dev]' builds it"


def _cli(*argv, code=0):
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def _edit_adapter(run, config=None, tensors=None):
    """Rewrites RUN/adapter: config keys updated from `config`, tensors passed through `tensors(state)`."""
    folder = run / "adapter"
    if config:
        settings = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    if tensors:
        state = load_file(folder / "adapter_model.safetensors")
        tensors(state)
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")


def _randomize_b(state):
    # A fresh LoRA B is zero and two steps move it little: random B makes the adapter change every logit.
    generator = torch.Generator().manual_seed(0)
    for key in state:
        if ".lora_B." in key:
            state[key] = torch.randn(state[key].shape, generator=generator) * 0.1


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """(a 2-step run of the tiny model with random LoRA B, its base GGUF from `export --format gguf-base`)."""
    from conftest import write_qa_recipe

    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    folder = tmp_path_factory.mktemp("gguf-lora")
    recipe = write_qa_recipe(folder, tiny_model_dir, 8, lora="  r: 4\n  alpha: 8\n  dropout: 0.0\n",
                             train="  lr: 2.0e-2\n  max_steps: 2\n  precision: fp32\n")
    train(load_recipe(recipe), "r", run_dir=folder / "run")
    _edit_adapter(folder / "run", tensors=_randomize_b)
    output = _cli("export", folder / "run", "--format", "gguf-base", "--out", folder / "base.gguf")
    assert f"--format gguf-lora --base {folder / 'base.gguf'}" in output
    return folder / "run", folder / "base.gguf", recipe


def _copy_run(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _llama_cpp_logits(model, ids, lora=None):
    """llama.cpp's next-token logits at every position of `ids` [len, vocab], with the LoRA file applied if given."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=64,
                          n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def _relative(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _prompt_ids(run) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    messages = [{"role": "user", "content": "What is item 3? A fever is"}, {"role": "assistant", "content": "Item 3 is"}]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


PEFT_SCALINGS = {
    "plain": ({}, None),  # alpha 8 / r 4: llama.cpp's own formula
    "rslora": ({"use_rslora": True}, None),  # alpha / sqrt(r): the difference is baked into B
    "patterns": ({"alpha_pattern": {"q_proj": 16.0}, "rank_pattern": {"v_proj": 2}},
                 lambda s: s.update({k: (v[:2] if ".lora_A." in k else v[:, :2]) for k, v in s.items() if "v_proj" in k})),
}


@pytest.mark.parametrize("scaling", list(PEFT_SCALINGS))
def test_base_plus_adapter_in_llama_cpp_equals_the_merged_model(trained, tmp_path, scaling):
    pytest.importorskip("llama_cpp", reason=NEEDS_LLAMA_CPP)
    from transformers import AutoModelForCausalLM

    source, base, _ = trained
    run = _copy_run(source, tmp_path)
    config, tensors = PEFT_SCALINGS[scaling]
    _edit_adapter(run, config, tensors)
    _cli("merge", run, "--out", tmp_path / "merged")
    _cli("export", tmp_path / "merged", "--out", tmp_path / "merged.gguf")
    output = _cli("export", run, "--format", "gguf-lora", "--base", base)
    adapter = run / "adapter.gguf"
    assert f"llama-cli -m {base} --lora {adapter}" in output and f"--format ollama-lora --base {base}" in output

    ids = _prompt_ids(run)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=torch.tensor([ids])).logits[0].numpy()
    pair = _llama_cpp_logits(base, ids, lora=adapter)
    merged = _llama_cpp_logits(tmp_path / "merged.gguf", ids)
    assert _relative(_llama_cpp_logits(base, ids), want) > 0.3  # the adapter matters: without it, logits are far off
    assert _relative(pair, merged) <= 1e-2 and _relative(pair, want) <= 1e-2
    assert np.array_equal(pair.argmax(-1), merged.argmax(-1)) and np.array_equal(pair.argmax(-1), want.argmax(-1))


def test_the_adapter_file_holds_what_llama_cpp_reads(trained, tmp_path):
    import gguf

    from llamatune import lock

    run = _copy_run(trained[0], tmp_path)
    _cli("export", run, "--format", "gguf-lora", "--out", tmp_path / "a.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type",
                                                        "adapter.lora.alpha")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    tensors = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors}
    assert len(tensors) == 2 * 2 * 7  # 2 layers × 7 linear layers × (A, B)
    assert tensors["blk.0.attn_k.weight.lora_a"] == ((64, 4), "F32")  # ggml order [in, r]
    assert tensors["blk.0.attn_k.weight.lora_b"] == ((4, 32), "F32")  # [r, out]: 2 KV heads × 16
    assert tensors["blk.1.ffn_down.weight.lora_a"] == ((128, 4), "F32")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with lock.hold(run / "adapter.gguf", "exporting"):  # a first writer, in this process
        assert f"pid {os.getpid()}" in _cli("export", run, "--format", "gguf-lora", code=1)
    assert not (run / "adapter.gguf").exists()


def test_what_llama_cpp_cannot_apply_is_refused_with_the_way_out(trained, tmp_path):
    source, _, recipe = trained
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    train(load_recipe(recipe, ["lora.use_dora=true"]), "d", run_dir=tmp_path / "dora")
    output = _cli("export", tmp_path / "dora", "--format", "gguf-lora", code=1)
    assert "use_dora is set" in output and "DoRA rescales" in output and "lora_magnitude_vector" in output
    assert "llamatune merge RUN, then llamatune export RUN/merged" in output
    assert not (tmp_path / "dora" / "adapter.gguf").exists()
    edits = {
        "modules_to_save": ({"modules_to_save": ["lm_head"]}, lambda s: s.update({
            "base_model.model.lm_head.weight": torch.zeros(1)})),
        "bias 'lora_only'": ({"bias": "lora_only"}, None),
        "lora_bias is set": ({"lora_bias": True}, lambda s: s.update({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)})),
        "init_lora_weights 'pissa_niter_4' changed the base weights": ({"init_lora_weights": "pissa_niter_4"}, None),
        "embed_tokens.lora_embedding_A": ({"target_modules": ["embed_tokens"]}, lambda s: s.update({
            "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 400)})),
    }
    for i, (expected, (config, tensors)) in enumerate(edits.items()):
        run = shutil.copytree(source, tmp_path / f"run{i}")
        _edit_adapter(run, config, tensors)
        output = _cli("export", run, "--format", "ollama-lora" if i % 2 else "gguf-lora", code=1)
        assert expected in output and "llamatune merge RUN" in output, output
        assert not (run / "adapter.gguf").exists() and not (run / "ollama-lora").exists()


def test_ollama_lora_folder_has_the_adapter_the_base_and_a_modelfile(trained, tmp_path):
    source, base, _ = trained
    run = _copy_run(source, tmp_path)
    output = _cli("export", run, "--format", "ollama-lora")
    folder = run / "ollama-lora"
    assert {p.name for p in folder.iterdir()} == {"adapter.gguf", "base.gguf", "Modelfile", "export_report.json"}
    assert f"ollama create run -f {folder.resolve() / 'Modelfile'}" in output
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\"")
    assert "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # The same bytes as the two files whose logits the tests above check in llama.cpp.
    _cli("export", run, "--format", "gguf-lora")
    assert (folder / "adapter.gguf").read_bytes() == (run / "adapter.gguf").read_bytes()
    assert (folder / "base.gguf").read_bytes() == base.read_bytes()

    _cli("export", run, "--format", "ollama-lora", "--base", base, "--out", tmp_path / "shared")
    assert {p.name for p in (tmp_path / "shared").iterdir()} == {"adapter.gguf", "Modelfile"}
    assert (tmp_path / "shared" / "Modelfile").read_text().startswith(f"FROM {base.resolve()}\nADAPTER ./adapter.gguf\n")
    assert "already exists" in _cli("export", run, "--format", "ollama-lora", code=1)
    assert not [p for p in list(run.iterdir()) + list(tmp_path.iterdir()) if p.name.startswith(".") and "lock" not in p.name]


def test_bad_arguments_are_exit_2_and_a_wrong_base_exit_1(trained, tiny_model_dir, tmp_path):
    import gguf

    source, base, _ = trained
    for argv, message in (
        ([tiny_model_dir, "--format", "gguf-lora"], "takes a run directory"),
        ([source, "--format", "gguf-lora", "--quant", "q8_0"], "the adapter is always written in f32"),
        ([source, "--format", "ollama-lora", "--quant", "q8_0", "--base", base], "ollama-lora without --base"),
        ([source, "--format", "gguf-lora", "--base", tmp_path / "none.gguf"], "no such file"),
        ([source, "--format", "gguf-base", "--base", base], "gguf-base writes the base"),
        ([tiny_model_dir, "--base", base], "only for --format gguf-lora or ollama-lora"),
        ([source, "--format", "lora"], "not supported; use gguf, ollama, gguf-lora, gguf-base, ollama-lora"),
    ):
        assert message in _cli("export", *argv, code=2)
    run = _copy_run(source, tmp_path)
    _cli("export", run, "--format", "gguf-lora")
    assert "not a Llama model GGUF" in _cli("export", run, "--format", "gguf-lora", "--base", run / "adapter.gguf",
                                            "--out", tmp_path / "x.gguf", code=1)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    assert "not a GGUF file" in _cli("export", run, "--format", "ollama-lora", "--base", tmp_path / "junk.gguf", code=1)
    other = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "llama")  # a Llama GGUF of another size
    other.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    for write in (other.write_header_to_file, other.write_kv_data_to_file, other.write_tensors_to_file, other.close):
        write()
    output = _cli("export", run, "--format", "gguf-lora", "--base", tmp_path / "other.gguf", "--out", tmp_path / "y.gguf",
                  code=1)
    assert "not the base this adapter was trained on: blk.0.attn_q.weight is (32, 32), the adapter needs (64, 64)" in output
    assert "already exists" in _cli("export", run, "--format", "gguf-lora", code=1)
    shutil.rmtree(run / "tokenizer")
    assert "tokenizer is missing" in _cli("export", run, "--format", "gguf-base", code=1)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_the_base_is_found_from_the_recipe_builtin_or_not(trained, tmp_path):
    from llamatune.artifacts.gguf_lora import base_folder
    from llamatune.catalog import cached_path, is_cached

    run = _copy_run(trained[0], tmp_path)
    recipe = (run / "recipe.yaml").read_text()
    model_line = next(line for line in recipe.splitlines() if line.startswith("  path: ") and "tiny-llama" in line)
    (run / "recipe.yaml").write_text(recipe.replace(model_line, f"  path: {tmp_path / 'moved-away'}"))
    output = _cli("export", run, "--format", "gguf-lora", code=2)
    assert f"in {run / 'recipe.yaml'}" in output and "(the run's base, needed for its GGUF)" in output
    if not is_cached(cached_path("smollm2-135m-instruct")):
        pytest.skip("smollm2-135m-instruct is not in llamatune's cache (tests never fetch it)")
    (run / "recipe.yaml").write_text(recipe.replace(model_line, "  path: smollm2-135m-instruct"))
    assert base_folder(run) == cached_path("smollm2-135m-instruct")  # no cache path known to the user


def test_export_help_names_the_adapter_formats():
    output = _cli("export", "--help")
    assert "gguf-lora" in output and "gguf-base" in output and "ollama-lora" in output and "--base" in output
