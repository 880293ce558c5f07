"""Exported GGUF files in llama.cpp itself (llama-cpp-python): every quant type loads and predicts like the model
it came from; llama.cpp tokenizes like training, formats chats with the embedded template to the training prompt,
and stops at the end-of-turn token; our Q4_K_M equals llama.cpp's own in tensor types and size."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llamatune.artifacts import llamacpp
from llamatune.artifacts.export import QUANTS
from llamatune.artifacts.gguf_vocab import pre_tokenizer_name
from llamatune.artifacts.probes import tokenizer_probes
from llamatune.cli import app
from llamatune.errors import LlamatuneError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: pip install -e '.[dev]' builds it")
IDS = [5, 17, 42, 99, 7, 3, 8, 11, 40, 2, 64, 128, 256, 300, 12, 13]
CHAT = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A raised body temperature."}, {"role": "user", "content": "And a rash?"}]


def _export(source: Path, out: Path, quant: str, fmt: str = "gguf") -> dict:
    result = CliRunner().invoke(app, ["export", str(source), "--quant", quant, "--format", fmt, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = out / "export_report.json" if fmt == "ollama" else out.with_name(out.stem + ".export_report.json")
    return json.loads(report.read_text())


def _transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_every_quant_type_of_the_tiny_model_loads_in_llama_cpp_and_predicts_like_it(tiny_model_dir, tmp_path):
    import gguf

    from llamatune.artifacts.export import _open_config, gguf_plan, tensor_types
    from llamatune.artifacts.weights import FolderWeights

    want = _transformers_logits(tiny_model_dir, IDS)
    config, _ = _open_config(tiny_model_dir)
    plan = gguf_plan(config, FolderWeights(tiny_model_dir))
    expected_types = tensor_types([(name, shape) for name, _, shape in plan], config, "q4_k_m")
    for quant in QUANTS:
        out = tmp_path / f"tiny-{quant}.gguf"
        report = _export(tiny_model_dir, out, quant)
        assert report["tokenizer"] == {"checked": True, "runtime": report["tokenizer"]["runtime"], "strings": 100,
                                       "identical": 100}
        assert report["quality"]["measured_in"].startswith("llama.cpp")
        llm = llamacpp.open_model(out)
        got = llamacpp.logits(llm, IDS)
        llm.close()
        assert np.isfinite(got).all()
        if quant == "f16":
            assert np.abs(got - want).max() / np.abs(want).max() <= 1e-2
            assert (got.argmax(-1) == want.argmax(-1)).all()
        elif quant == "q8_0":
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
        if quant == "q4_k_m":  # the file holds the types the mix says (all 32-block fallbacks at this width)
            types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
            assert types == expected_types


def test_llama_cpp_tokenizes_100_strings_like_training_and_refuses_what_it_cannot(tiny_model_dir, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    out = tmp_path / "tiny.gguf"
    _export(tiny_model_dir, out, "f16")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert pre_tokenizer_name(tok) == "gpt-2"
    assert llamacpp.tokenizer_mismatches(out, tok, tokenizer_probes()) == []

    odd = tmp_path / "odd-tokenizer"  # whitespace splitting: no llama.cpp pre-tokenizer does this
    shutil.copytree(tiny_model_dir, odd)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.save_pretrained(odd)
    result = CliRunner().invoke(app, ["export", str(odd), "--out", str(tmp_path / "odd.gguf")])
    assert result.exit_code == 1 and "no pre-tokenizer known" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "odd.gguf").exists() and not list(tmp_path.glob(".odd*"))


def test_llama_cpp_formats_chats_with_the_embedded_template_like_training(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from llamatune.data.encode import render_chat

    out = tmp_path / "tiny.gguf"
    _export(tiny_model_dir, out, "q8_0")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    llm = llamacpp.open_model(out)
    try:
        for messages in (CHAT[:2], CHAT, CHAT[1:2]):
            assert llamacpp.chat_prompt(llm, messages) == render_chat(tok, messages, True)
    finally:
        llm.close()


def test_pre_tokenizer_names_by_structure_and_refusals(tiny_model_dir):
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import AutoTokenizer

    from llamatune.artifacts.gguf_vocab import _LLAMA3_SPLIT

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert pre_tokenizer_name(tok) == "smollm"
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert pre_tokenizer_name(tok) == "llama-bpe"
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(LlamatuneError, match="no pre-tokenizer known"):
        pre_tokenizer_name(tok)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.normalizer = normalizers.NFKC()
    with pytest.raises(LlamatuneError, match="normalizes text"):
        pre_tokenizer_name(tok)


# --- the real builtin model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_export_tokenizes_formats_and_stops_in_llama_cpp(builtin_folder, tmp_path):
    from transformers import AutoTokenizer

    from llamatune.data.encode import render_chat

    out = tmp_path / "smol-q8_0.gguf"
    report = _export(builtin_folder, out, "q8_0")
    assert report["tokenizer"]["identical"] == 100
    # plain sentences the base model predicts with little confidence: near-ties flip, the KL stays small
    assert report["quality"]["top1_agreement"] >= 0.85 and report["quality"]["mean_kl"] <= 0.05
    tok = AutoTokenizer.from_pretrained(builtin_folder)
    llm = llamacpp.open_model(out, n_ctx=1024)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
        assert llamacpp.chat_prompt(llm, CHAT) == render_chat(tok, CHAT, True)
        done = llm.create_chat_completion(messages=CHAT[1:2], max_tokens=200, temperature=0.0)
        assert done["choices"][0]["finish_reason"] == "stop"  # ended at <|im_end|>, not the token limit
        assert "<|im_end|>" not in done["choices"][0]["message"]["content"]
    finally:
        llm.close()
    # f16: llama.cpp's greedy answer is transformers' greedy answer, token for token
    from transformers import AutoModelForCausalLM

    f16 = tmp_path / "smol-f16.gguf"
    _export(builtin_folder, f16, "f16")
    prompt = tok(render_chat(tok, CHAT[1:2], True), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(builtin_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    llm = llamacpp.open_model(f16, n_ctx=512)
    try:
        got = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == len(want) or token == tok.eos_token_id:
                break
    finally:
        llm.close()
    assert got == want[: len(got)] and len(got) >= min(len(want), 8), (got, want)


@pytest.mark.slow
def test_our_q4_k_m_is_llama_cpps_own_in_types_size_and_agreement(builtin_folder, tmp_path):
    import ctypes

    import gguf

    from llamatune.artifacts.export_report import file_facts, quality

    ours = tmp_path / "ours-q4_k_m.gguf"
    report = _export(builtin_folder, ours, "q4_k_m")
    f16 = tmp_path / "smol-f16.gguf"
    _export(builtin_folder, f16, "f16")
    theirs = tmp_path / "theirs-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = os.cpu_count() or 2
    with llamacpp._quiet():
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors}
    theirs_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
    assert ours_types == theirs_types
    assert abs(file_facts(ours)["size_bytes"] - file_facts(theirs)["size_bytes"]) < 64 * 1024  # metadata aside
    from llamatune.artifacts.export import _open_config
    from llamatune.artifacts.weights import FolderWeights

    config, tok = _open_config(builtin_folder)
    mine, other = report["quality"], quality(theirs, config, FolderWeights(builtin_folder), tok, builtin_folder, print)
    assert mine["examples"] == 5 and other["positions"] == mine["positions"]
    # Each tensor as close to the weights as llama.cpp's (measured against its f16 input, which favours it).
    from gguf.quants import dequantize

    f16s = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    theirs_t = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    for t in gguf.GGUFReader(ours).tensors:
        if t.tensor_type.name != "F32":
            ref = np.asarray(f16s[t.name].data, dtype=np.float32)
            err = [np.linalg.norm(dequantize(x.data, x.tensor_type).reshape(ref.shape) - ref) for x in (t, theirs_t[t.name])]
            assert err[0] <= err[1] * 1.01, (t.name, err)
    # End to end on 94 answer tokens a single top-1 flip is 1.1% and the KL moves by a third between near-equal
    # files (CPUs' float paths differ too), so this only guards against a gross miss.
    n = mine["positions"]
    assert round(mine["top1_agreement"] * n) >= round(other["top1_agreement"] * n) - 3, (mine, other)
    assert mine["mean_kl"] <= other["mean_kl"] * 1.5 + 0.01, (mine, other)


@pytest.mark.slow
def test_fine_tune_a_q4_k_m_gguf_and_deploy_it_back_to_llama_cpp(builtin_folder, tmp_path, monkeypatch):
    """The round trip a user with only a GGUF makes: llama.cpp's Q4_K_M file as model.path → train → merge →
    export q4_k_m → llama.cpp: loads, tokenizes like training (export checks 100 strings), stops at end-of-turn."""
    import ctypes

    f16, start = tmp_path / "smol-f16.gguf", tmp_path / "smol-Q4_K_M.gguf"
    _export(builtin_folder, f16, "f16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    with llamacpp._quiet():
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(start).encode(), ctypes.byref(params)) == 0
    monkeypatch.setenv("LLAMATUNE_CACHE_DIR", str(tmp_path / "cache"))  # the .gguf is converted once, here
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    runner = CliRunner()
    for argv in (["train", str(quickstart), "--run-dir", str(tmp_path / "run"), "--set", f"model.path={start}",
                  "--set", "train.epochs=null", "--set", "train.max_steps=2", "--set", "train.micro_batch_size=4"],
                 ["merge", str(tmp_path / "run")]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    out = tmp_path / "tuned-q4_k_m.gguf"
    report = _export(tmp_path / "run" / "merged", out, "q4_k_m")
    assert report["tokenizer"]["identical"] == 100
    assert report["quality"]["from"].startswith("held-out data of") and report["quality"]["examples"] == 8
    llm = llamacpp.open_model(out, n_ctx=1024)
    try:
        done = llm.create_chat_completion(messages=CHAT[1:2], max_tokens=200, temperature=0.0)
        assert done["choices"][0]["finish_reason"] == "stop"
    finally:
        llm.close()
