"""Conversion, merge and export tensor by tensor: the same numbers as the whole-model code paths of transformers and
peft, and peak memory that grows with the largest tensor, not with the model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.recipe import load_recipe
from llamatune.train.loop import train


def _wide_model(folder: Path, tokenizer_from: Path, hidden: int = 256, inter: int = 512, layers: int = 2,
                heads: int = 4, kv: int = 2, tied: bool = False) -> Path:
    """A random Llama whose rows divide into 256-weight K-quant blocks (the tiny model's 64 do not), untied head."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_model_dir):
    return _wide_model(tmp_path_factory.mktemp("wide"), tiny_model_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    from conftest import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("stream-run"), tiny_model_dir)


def _cli(*argv, code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == code, result.output
    return result.output


def _state(folder: Path) -> dict:
    from llamatune.artifacts.tensors import Safetensors

    files = Safetensors.folder(folder)
    return {n: files.read(n) for n in files.names()}


# ---- conversion -----------------------------------------------------------------------------------------------------

def _llama_cpp_file(f16: Path, out: Path, ftype: str) -> Path:
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    from llamatune.artifacts import llamacpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    with llamacpp._quiet():
        assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "BF16"])
def test_conversion_is_transformers_whole_model_load_tensor_for_tensor(wide, tmp_path, kind):
    """Every GGUF type transformers dequantizes: the streamed float32 conversion equals transformers' own GGUF load
    exactly; `auto` stores the narrow type (bfloat16 for a BF16 file, else float16) of the same values."""
    from transformers import AutoModelForCausalLM

    from llamatune.catalog import convert_gguf, gguf_storage_dtype

    if kind == "BF16":  # the file a user brings from llama.cpp's own converter; ours writes F16 and the quants
        _cli("export", wide, "--out", tmp_path / "f16.gguf")
        gguf = _llama_cpp_file(tmp_path / "f16.gguf", tmp_path / "m.gguf", "BF16")
    else:
        gguf = tmp_path / "m.gguf"
        _cli("export", wide, "--quant", kind, "--out", gguf)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).state_dict()
    convert_gguf(gguf, tmp_path / "fp32", source={"gguf": str(gguf)}, dtype="float32", say=lambda _: None)
    ours = _state(tmp_path / "fp32")
    assert set(ours) == set(whole) and "lm_head.weight" in ours  # the untied head is kept
    assert all(torch.equal(ours[n], whole[n]) for n in ours)

    narrow = gguf_storage_dtype(gguf, "auto")
    assert narrow == ("bfloat16" if kind == "BF16" else "float16")
    convert_gguf(gguf, tmp_path / "auto", source={"gguf": str(gguf)}, dtype=narrow, say=lambda _: None)
    for name, tensor in _state(tmp_path / "auto").items():
        assert torch.equal(tensor, whole[name].to(getattr(torch, narrow))), name
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == narrow


def test_a_gguf_that_is_not_a_whole_llama_model_is_refused_by_name(wide, tmp_path):
    import gguf as gguf_py

    from llamatune.catalog import convert_gguf
    from llamatune.errors import LlamatuneError

    good = tmp_path / "m.gguf"
    _cli("export", wide, "--out", good)
    reader = gguf_py.GGUFReader(good)
    cut = tmp_path / "cut.gguf"  # the same header and metadata without blk.1's tensors: a file missing a layer
    writer = gguf_py.GGUFWriter(str(cut), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("general.architecture", "GGUF.")):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf_py.GGUFValueType.ARRAY:
            writer.add_key_value(field.name, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(field.name, value, kind)
    for t in reader.tensors:
        if not t.name.startswith("blk.1."):
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LlamatuneError, match=r"cut.gguf lacks blk\.1\.attn_norm\.weight"):
        convert_gguf(cut, tmp_path / "out", source={}, say=lambda _: None)
    assert not (tmp_path / "out").exists()


# ---- merge and export ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_merge_is_peft_merge_and_unload(run, tmp_path, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _cli("merge", run, "--out", tmp_path / "m", "--dtype", dtype)
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["method"].startswith("tensor by tensor")
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run / "adapter")
    reference = peft.merge_and_unload().state_dict()
    ours = _state(tmp_path / "m")
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: the head is the embeddings
    worst = max(float((ours[n].float() - reference[n]).abs().max()) for n in ours)
    if dtype == "fp32":
        assert worst <= 1e-6, worst  # W + scale·B@A in float32 either way; block-wise B@A may differ in the last bit
    else:
        # each merged value rounded once to bfloat16: within half a bfloat16 step of peft's float32 merge
        for n in ours:
            assert ours[n].dtype == torch.bfloat16
            torch.testing.assert_close(ours[n].float(), reference[n], rtol=2 ** -8, atol=1e-30)


def test_export_from_a_run_is_the_export_of_its_merge(run, tmp_path):
    import gguf

    _cli("merge", run, "--out", tmp_path / "merged")
    _cli("export", tmp_path / "merged", "--quant", "q8_0", "--out", tmp_path / "from-merged.gguf")
    out = _cli("export", run, "--quant", "q8_0", "--out", tmp_path / "from-run.gguf")
    assert "from-run.gguf" in out
    a = {t.name: t for t in gguf.GGUFReader(tmp_path / "from-merged.gguf").tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "from-run.gguf").tensors}
    assert list(a) == list(b)
    differ = [n for n in a if not (a[n].tensor_type == b[n].tensor_type and (a[n].data == b[n].data).all())]
    assert differ == [], differ
    report = json.loads((tmp_path / "from-run.export_report.json").read_text())
    assert report["quality"]["from"] == f"held-out data of {run}"  # measured on the run's own held-out answers
    # the run's Modelfile carries the run's name and trained system prompt decision, as from its merge
    _cli("export", run, "--format", "ollama", "--out", tmp_path / "ollama")
    assert (tmp_path / "ollama" / "Modelfile").is_file() and (tmp_path / "ollama" / "model.gguf").is_file()


def test_layer_by_layer_logits_are_the_whole_models(run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamatune.artifacts import layerwise, lora
    from llamatune.artifacts.weights import FolderWeights

    config = AutoConfig.from_pretrained(tiny_model_dir)
    prompts = [[5, 17, 42, 99, 7, 3, 250], [11, 12], [300] * 20]
    whole = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours = layerwise.logits(config, FolderWeights(tiny_model_dir), prompts)
    tuned = PeftModel.from_pretrained(whole, run / "adapter").eval()
    hooked = layerwise.logits(config, FolderWeights(tiny_model_dir), prompts, layerwise.lora_hooks(lora.Deltas(run, config)))
    with torch.no_grad():
        for ids, plain, with_lora in zip(prompts, ours, hooked):
            with tuned.disable_adapter():
                torch.testing.assert_close(plain, tuned(input_ids=torch.tensor([ids])).logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(with_lora, tuned(input_ids=torch.tensor([ids])).logits[0], rtol=0, atol=1e-5)


def test_gguf_quality_layer_by_layer_is_llama_cpps(wide, tmp_path, monkeypatch):
    """A GGUF over LLAMA_CPP_MAX_BYTES is measured layer by layer on its dequantized tensors: the same numbers llama.cpp
    gives for a file it can hold (its own float paths aside)."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoConfig, AutoTokenizer

    from llamatune.artifacts import export_report
    from llamatune.artifacts.weights import FolderWeights

    _cli("export", wide, "--quant", "q4_k_m", "--out", tmp_path / "m.gguf")
    config, tok = AutoConfig.from_pretrained(wide), AutoTokenizer.from_pretrained(wide)
    in_llama_cpp = export_report.quality(tmp_path / "m.gguf", config, FolderWeights(wide), tok, wide, print)
    monkeypatch.setattr(export_report, "LLAMA_CPP_MAX_BYTES", 0)
    layered = export_report.quality(tmp_path / "m.gguf", config, FolderWeights(wide), tok, wide, print)
    assert in_llama_cpp["measured_in"].startswith("llama.cpp") and layered["measured_in"].startswith("llamatune layer")
    assert abs(layered["mean_kl"] - in_llama_cpp["mean_kl"]) <= 0.05 * in_llama_cpp["mean_kl"] + 1e-4, (layered, in_llama_cpp)
    assert abs(layered["perplexity_gguf"] / in_llama_cpp["perplexity_gguf"] - 1) < 1e-3


# ---- memory ----------------------------------------------------------------------------------------------------------

_MEASURE = """
import sys
from llamatune.cli import app
from llamatune.memory import peak_rss_bytes
try:
    app(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
print("PEAK", peak_rss_bytes())
"""


_CONVERT = """
import sys
from pathlib import Path
from llamatune.catalog import convert_gguf
from llamatune.memory import peak_rss_bytes
convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), {}, dtype="float16", say=lambda _: None)
print("PEAK", peak_rss_bytes())
"""


_LOAD = """
import sys
from llamatune.model import load_base
from llamatune.memory import peak_rss_bytes
from llamatune.schema import ModelSpec, QuantizationSpec
load_base(sys.argv[1], ModelSpec(path=sys.argv[1], dtype="bfloat16"), QuantizationSpec(), precision="bf16")
print("PEAK", peak_rss_bytes())
"""


def _peak(script: str, *argv) -> int:
    """Peak RSS of `python -c SCRIPT ARGV...` in a fresh process (_MEASURE: the llamatune command ARGV)."""
    done = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(done.stdout.rsplit("PEAK", 1)[1])


@pytest.mark.slow
def test_peak_memory_grows_with_a_layer_not_with_the_model(tmp_path, tiny_model_dir):
    """Merge, export and conversion of a 12-layer ~400 MiB model against the same of the tiny one, each in a fresh
    process. Tensors are read, merged, quantized and written a block at a time, and the parity and quality checks
    hold one decoder layer (34 MB in float32 here) at a time, so the peak grows by about a layer and two of its
    largest tensors (9 MB each), plus allocator slack, where loading the model whole would add 400 MiB or more.
    Export also runs llama.cpp on the file it wrote when the file is small enough (at most 2 GiB), which maps it."""
    from conftest import write_qa_recipe

    big = _wide_model(tmp_path / "big", tiny_model_dir, hidden=768, inter=3072, layers=12, heads=12, kv=4, tied=True)
    size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
    largest, layer = 768 * 3072 * 4, (2 * 768 * 768 + 2 * 768 * 256 + 3 * 768 * 3072 + 2 * 768) * 4
    peaks = {}
    for name, model in (("tiny", tiny_model_dir), ("big", big)):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        recipe = write_qa_recipe(folder, model, 8, lora="  r: 4\n  dropout: 0.0\n", train="  max_steps: 1\n")
        train(load_recipe(recipe), "r", run_dir=folder / "run")
        peaks[name] = {"merge": _peak(_MEASURE, "merge", folder / "run", "--out", folder / "merged"),
                       "export": _peak(_MEASURE, "export", folder / "merged", "--quant", "q8_0", "--out", folder / "m.gguf"),
                       "convert": _peak(_CONVERT, folder / "m.gguf", folder / "back"),
                       "load in bf16": _peak(_LOAD, model)}
    mapped = (tmp_path / "big" / "m.gguf").stat().st_size
    measured_in = json.loads((tmp_path / "big" / "m.export_report.json").read_text())["quality"]["measured_in"]
    print(f"model {size / 2**20:.0f} MiB, layer {layer / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          "peaks (MiB):", {k: {s: round(v / 2**20) for s, v in p.items()} for k, p in peaks.items()})
    assert size > 380 * 2**20
    bound = layer + 2 * largest + 64 * 2**20
    # loading the float32 folder in bfloat16 holds the bf16 model and a tensor, not the model's file pages too
    grown = peaks["big"]["load in bf16"] - peaks["tiny"]["load in bf16"]
    assert grown <= size / 2 + 2 * largest + 64 * 2**20, (grown / 2**20, size / 2**20)
    for step in ("merge", "export", "convert"):
        grown = peaks["big"][step] - peaks["tiny"][step]
        allowed = bound + (mapped if step == "export" and measured_in.startswith("llama.cpp") else 0)
        assert grown <= allowed, (step, grown / 2**20, allowed / 2**20)
