"""The NumPy GGML quantizers against llama.cpp itself: the same float32 values go through
`llama_model_quantize` (from a tiny F32 GGUF) and through `quants.quantize`, and the blocks are compared byte
for byte; the per-tensor type mix is compared with the types in llama.cpp's own mixed files."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from llamatune.artifacts import quants
from llamatune.errors import LlamatuneError

# our type -> the llama.cpp file type whose default type it is (quantized with `pure`, one type everywhere)
PURE_FTYPE = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
              "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K"}
MIN_IDENTICAL = 0.999  # the issue's acceptance threshold; the measured fraction is 1.0 for every type


def varied(rng: np.random.Generator, rows_per_kind: int, cols: int) -> np.ndarray:
    """(rows, cols) float32 rows of many kinds: what real weights are, and the edge cases of the searches."""
    shape = (rows_per_kind, cols)
    outlier = rng.standard_normal(shape) * 0.02
    outlier[:, ::97] = 40.0  # one huge value in most blocks
    near_constant = 0.75 + rng.standard_normal(shape) * 1e-6
    sparse = rng.standard_normal(shape)
    sparse[rng.random(shape) < 0.7] = 0
    kinds = [
        rng.standard_normal(shape) * 0.02,            # normal, weight-like scale
        rng.standard_t(2, shape) * 0.02,              # heavy tails
        np.zeros(shape), np.full(shape, 0.37), np.full(shape, -1.5),  # zero and constant rows
        np.copysign(np.zeros(shape), rng.standard_normal(shape)),       # signed zeros
        rng.standard_normal(shape) * 1e-7,            # tiny magnitudes (scales near half-precision's floor)
        rng.integers(-8, 8, shape) * 0.125,           # exact ties for every rounding step
        rng.exponential(0.05, shape),                 # one-signed
        outlier, near_constant, sparse,
    ]
    return np.concatenate(kinds).astype(np.float32)


def _llama_cpp():
    return pytest.importorskip("llama_cpp",
                               reason="llama-cpp-python not installed: pip install -e '.[dev]' builds it")


def write_gguf(path: Path, tensors: dict[str, np.ndarray], n_layers: int,
               raw: dict[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """A GGUF with just enough Llama metadata for llama.cpp's quantizer (it reads hyperparameters, not the
    vocabulary, and never builds the graph, so tensor shapes need not form a runnable model)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(64)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    for name, (packed, qtype) in (raw or {}).items():  # already quantized blocks
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_quantize(src: Path, dst: Path, ftype: str, pure: bool) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (type name, packed bytes (rows, bytes_per_row)) of llama.cpp's quantization of `src`
    (ftype "ALL_F32": llama.cpp's own dequantization of a quantized `src`)."""
    import gguf

    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + (ftype if ftype == "ALL_F32" else f"MOSTLY_{ftype.upper()}"))
    params.pure = pure
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in gguf.GGUFReader(str(dst)).tensors}


def compare_with_llama_cpp(x: np.ndarray, qtype: str, tmp_path: Path) -> dict:
    """Quantizes x both ways; the fraction of identical blocks and both dequantized MSEs against x."""
    src = write_gguf(tmp_path / "src.gguf", {"blk.0.ffn_up.weight": x}, n_layers=1)
    got_type, ref = llama_cpp_quantize(src, tmp_path / "ref.gguf", PURE_FTYPE[qtype], pure=True)["blk.0.ffn_up.weight"]
    assert got_type == qtype
    ours = quants.quantize(x, qtype)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    nbytes = quants.block_layout(qtype)[1]
    identical = (ours.reshape(-1, nbytes) == ref.reshape(-1, nbytes)).all(axis=1)
    mse = {name: float(np.mean((quants.dequantize(packed, qtype, x.shape) - x) ** 2)) for name, packed in
           (("ours", ours), ("llama.cpp", ref))}
    return {"identical": float(identical.mean()), "blocks": identical.size, **mse}


def assert_matches(stats: dict, qtype: str) -> None:
    print(f"{qtype}: {stats}")
    assert stats["identical"] >= MIN_IDENTICAL, stats
    assert stats["ours"] <= stats["llama.cpp"], stats  # no slack: identical bytes give identical errors


@pytest.mark.parametrize("qtype", quants.QTYPES)
def test_blocks_equal_llama_cpp(qtype, tmp_path):
    x = varied(np.random.default_rng(7), rows_per_kind=3, cols=1024)
    assert_matches(compare_with_llama_cpp(x, qtype, tmp_path), qtype)


@pytest.mark.parametrize("qtype", quants.QTYPES)
def test_dequantize_equals_llama_cpp(qtype, tmp_path):
    x = varied(np.random.default_rng(5), rows_per_kind=2, cols=512)
    packed = quants.quantize(x, qtype)
    src = write_gguf(tmp_path / "q.gguf", {}, n_layers=1, raw={"blk.0.ffn_up.weight": (packed, qtype)})
    (got_type, theirs), = llama_cpp_quantize(src, tmp_path / "f32.gguf", "ALL_F32", pure=True).values()
    assert got_type == "F32"
    ours = quants.dequantize(packed, qtype, x.shape)
    assert np.array_equal(ours.view(np.uint32), theirs.reshape(x.shape).view(np.uint32))  # bit for bit


def test_chunks_and_threads_do_not_change_the_bytes(monkeypatch):
    x = varied(np.random.default_rng(3), rows_per_kind=2, cols=512)
    whole = {qtype: quants.quantize(x, qtype, threads=1) for qtype in ("Q4_0", "Q4_K", "Q6_K")}
    monkeypatch.setattr(quants, "CHUNK_WEIGHTS", 1000)  # one row per chunk, many chunks
    for qtype, expected in whole.items():
        assert np.array_equal(quants.quantize(x, qtype, threads=2), expected), qtype


def test_dequantize_round_trip_is_close():
    x = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    bound = {"Q4_0": 0.02, "Q4_1": 0.02, "Q5_0": 0.005, "Q5_1": 0.005, "Q8_0": 1e-4, "Q4_K": 0.02, "Q5_K": 0.005,
             "Q6_K": 0.002}
    for qtype in quants.QTYPES:
        packed = quants.quantize(x.astype(np.float16), qtype)  # any float input is taken as float32
        back = quants.dequantize(packed, qtype, x.shape)
        assert back.dtype == np.float32 and back.shape == x.shape
        assert np.mean((back - x) ** 2) < bound[qtype], qtype


def test_packed_tensor_goes_into_a_gguf_as_is(tmp_path):
    import gguf

    x = np.random.default_rng(2).standard_normal((6, 512)).astype(np.float32)
    packed = quants.quantize(x, "Q4_K")
    writer = gguf.GGUFWriter(str(tmp_path / "one.gguf"), "llama")
    writer.add_tensor("w.weight", packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(tmp_path / "one.gguf")).tensors
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_K and list(tensor.shape) == [512, 6]  # ne order
    assert np.array_equal(np.array(tensor.data).reshape(packed.shape), packed)


@pytest.mark.parametrize("data, qtype, message", [
    (np.zeros((2, 256), np.float32), "Q3_K", "not supported"),
    (np.zeros(256, np.float32), "Q4_0", "2-D"),
    (np.zeros((2, 576), np.float32), "q4_k", "multiple of 256"),
    (np.full((2, 64), np.nan, np.float32), "q8_0", "NaN"),
])
def test_user_errors_are_clear(data, qtype, message):
    with pytest.raises(LlamatuneError, match=message):
        quants.quantize(data, qtype)


# ------------------------------------------------------------------------------------------------ type mix

def llama_layout(n_layers: int, hidden: int, kv: int, ffn: int, vocab: int, tied: bool) -> list[tuple[str, tuple]]:
    """GGUF names and NumPy shapes of a Llama model, in the order llamatune's export writes them."""
    names = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layers):
        names += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (hidden, hidden)),
                  (f"blk.{i}.attn_k.weight", (kv, hidden)), (f"blk.{i}.attn_v.weight", (kv, hidden)),
                  (f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                  (f"blk.{i}.ffn_gate.weight", (ffn, hidden)), (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
                  (f"blk.{i}.ffn_down.weight", (hidden, ffn))]
    names.append(("output_norm.weight", (hidden,)))
    return names if tied else names + [("output.weight", (vocab, hidden))]


# A: 256 columns take the K-quant path (attn_v's more-bits layers show), while ffn_down's 264 columns fit no
# block at all (-> F16). B: 320 columns demote every K-quant (Q5_0 / Q5_1 / Q8_0), ffn_down's 512 columns
# show the more-bits layers over 9 layers, and the output head is separate.
LAYOUTS = {"A": dict(n_layers=8, hidden=256, kv=32, ffn=264, vocab=300, tied=True),
           "B": dict(n_layers=9, hidden=320, kv=64, ffn=512, vocab=260, tied=False)}
MIX_FTYPES = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q4_0")


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory):
    _llama_cpp()
    folder = tmp_path_factory.mktemp("layouts")
    files = {}
    for key, spec in LAYOUTS.items():
        layout = llama_layout(**spec)
        tensors = {name: np.zeros(shape, np.float32 if len(shape) == 1 else np.float16) for name, shape in layout}
        files[key] = (write_gguf(folder / f"{key}.gguf", tensors, spec["n_layers"]), layout)
    return files


@pytest.mark.parametrize("ftype", MIX_FTYPES)
@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_type_mix_equals_llama_cpp(key, ftype, layout_files, tmp_path):
    src, layout = layout_files[key]
    spec = LAYOUTS[key]
    written = llama_cpp_quantize(src, tmp_path / "mix.gguf", ftype, pure=False)
    theirs = {name: qtype for name, (qtype, _) in written.items()}
    ours = quants.tensor_types(layout, ftype, spec["n_layers"], spec["tied"])
    wrong = {name: (ours[name], theirs[name]) for name in theirs if ours[name] != theirs[name]}
    assert not wrong, f"{len(wrong)} of {len(theirs)} tensors differ (ours, llama.cpp): {wrong}"
    assert set(ours) == set(theirs)


def test_type_mix_rules_without_llama_cpp():
    layout = llama_layout(n_layers=32, hidden=4096, kv=1024, ffn=14336, vocab=128256, tied=False)  # Llama-3-8B
    mix = quants.tensor_types(layout, "q4_k_m", 32, tied=False)
    more = [i for i in range(32) if quants.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if mix[f"blk.{i}.attn_v.weight"] == "Q6_K"] == more
    assert [i for i in range(32) if mix[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert mix["output.weight"] == "Q6_K" and mix["token_embd.weight"] == "Q4_K"
    assert mix["blk.5.attn_q.weight"] == "Q4_K"
    assert mix["blk.0.attn_norm.weight"] == "F32"
    small = quants.tensor_types(llama_layout(30, 576, 192, 1536, 49152, tied=True), "q4_k_s", 30, tied=True)
    assert small["token_embd.weight"] == "Q8_0"  # tied head with 576 columns
    assert small["blk.0.attn_v.weight"] == "Q5_1" and small["blk.4.attn_v.weight"] == "Q5_0"  # Q5_K / Q4_K demoted
    assert small["blk.2.ffn_down.weight"] == "Q5_K" and small["blk.3.ffn_down.weight"] == "Q4_K"  # 30 // 8 == 3
    big = quants.tensor_types(llama_layout(80, 8192, 1024, 28672, 128256, tied=False), "q4_k_m", 80, tied=False)
    assert [big[f"blk.{i}.attn_v.weight"] for i in (9, 10, 12)] == ["Q6_K", "Q5_K", "Q6_K"]  # 70B: no Q4_K attn_v
    with pytest.raises(LlamatuneError, match="output.weight"):
        quants.tensor_types(layout, "q4_k_m", 32, tied=True)
    with pytest.raises(LlamatuneError, match="not supported"):
        quants.tensor_types(layout, "q3_k_m", 32, tied=False)


# ------------------------------------------------------------------------------------------------ real weights

@pytest.fixture(scope="module")
def real_weights():
    from llamatune.catalog import cached_path, is_cached

    folder = cached_path("smollm2-135m-instruct")
    if not is_cached(folder):
        pytest.skip("builtin model not cached: llamatune models pull smollm2-135m-instruct")
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", quants.QTYPES)
def test_blocks_equal_llama_cpp_on_real_weights(qtype, real_weights, tmp_path):
    """SmolLM2-135M's tensors: ffn_down (1536 columns) as it is, and 576-column tensors viewed as 256-column
    rows so that the K-quants see real values too."""
    layer = "model.layers.{}.{}.weight"
    parts = [real_weights[layer.format(i, "mlp.down_proj")] for i in (0, 15, 29)]
    if qtype.endswith("_K"):
        parts = [p.reshape(-1, 256) for p in parts]
    wide = [real_weights[layer.format(i, name)] for i in (0, 29) for name in ("self_attn.q_proj", "self_attn.v_proj",
                                                                              "mlp.gate_proj")]
    wide.append(real_weights["model.embed_tokens.weight"][:2048])
    cols = parts[0].shape[1]
    x = np.concatenate(parts + [p.reshape(-1, cols) for p in wide]).astype(np.float32)
    assert_matches(compare_with_llama_cpp(x, qtype, tmp_path), qtype)
