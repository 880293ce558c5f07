"""`llamatune export --format gguf|ollama`: a Llama model folder → one GGUF file (and an Ollama Modelfile), in pure Python on the `gguf`
package (no llama.cpp checkout, no compiled tools).

Layout follows llama.cpp's Llama conventions: `token_embd`, `blk.N.attn_q|attn_k|attn_v|attn_output|
attn_norm|ffn_gate|ffn_up|ffn_down|ffn_norm`, `output_norm`, `output` (absent when tied); Q and K rows
are permuted from Hugging Face's rotary layout to llama.cpp's (the inverse of what loaders undo);
norms stay float32. The tokenizer (tokens, types, merges, special ids) and the chat template go into
the metadata, so the file is self-contained.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable

from llamatune.artifacts.files import check_output, fix_for_model, is_run, opened
from llamatune.artifacts.gguf_vocab import add_tokenizer
from llamatune.artifacts.modelfile import ollama_modelfile, ollama_name
from llamatune.errors import LlamatuneError
from llamatune.progress import Phase

# Hugging Face Llama layer module → llama.cpp tensor name (also what a GGUF LoRA adapter names its pairs after).
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# What `--quant` offers: f16, and llama.cpp's file types, each the same per-tensor mix llama.cpp's quantizer
# writes (artifacts/quants.py: the K-quant mixes give some attention-value / FFN-down layers and the output
# head more bits, and tensors whose rows are not a multiple of 256 a 32-block type).
QUANTS = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0")


def export(source: Path, fmt: str, quant: str | None, out: Path | None, base: Path | None,
           say: Callable[[str], None] = print) -> Path:
    """`llamatune export`: a model folder as gguf / ollama, a run as gguf-lora / gguf-base / ollama-lora.

    Raises:
        RecipeError: For a format, quant type, --base or SOURCE that does not fit (exit 2).
        LlamatuneError: For what goes wrong writing (see export_gguf, export_ollama, gguf_lora.export_run).
    """
    from llamatune.artifacts.gguf_lora import RUN_FORMATS, export_run
    from llamatune.errors import RecipeError

    if fmt not in ("gguf", "ollama", *RUN_FORMATS):
        raise RecipeError([f"--format: {fmt!r} is not supported; use gguf, ollama, {', '.join(RUN_FORMATS)}"])
    kind = checked_quant(quant)
    if fmt in RUN_FORMATS:
        return export_run(source, fmt, quant and kind, out, base, say=say)
    if base is not None:
        raise RecipeError(["--base: only for --format gguf-lora or ollama-lora (an adapter's base GGUF)"])
    opened_run = _open_run(source, say) if is_run(source) else {}
    if not opened_run and not (source / "config.json").is_file():
        raise RecipeError([f"{source}: neither a model folder (no config.json) nor a run (no recipe.yaml and adapter/); "
                           "give a run, its merged folder, or a Hugging Face model folder"])
    if fmt == "ollama":
        return export_ollama(source, out or source.parent / f"{source.name}-ollama", kind, say=say, **opened_run)
    return export_gguf(source, out or source.parent / f"{source.name}-{kind}.gguf", kind, say=say, **opened_run)


def _open_run(run: Path, say: Callable[[str], None]) -> dict:
    """The config, tokenizer and weights of a run's base + adapter, merged tensor by tensor as export reads them."""
    from llamatune.artifacts import lora
    from llamatune.artifacts.gguf_lora import base_folder
    from llamatune.artifacts.weights import MergedWeights
    from llamatune.evaluate.target import run_tokenizer

    base = base_folder(run, say)
    config, _ = _open_config(base)
    deltas = lora.Deltas(run, config)
    if deltas.problems:
        raise LlamatuneError(f"{run}: this adapter is more than W + scale·B·A ({deltas.problems[0]}), so it is not "
                             f"merged on the fly; merge it first (llamatune merge {run}) and export {run}/merged")
    return {"tokenizer": run_tokenizer(run), "weights": MergedWeights(base, deltas), "config": config}


def export_gguf(source: Path, out: Path, quant: str = "f16", say: Callable[[str], None] = print, tokenizer=None,
                weights=None, config=None) -> Path:
    """Writes `out` (.gguf) from a Llama model folder (e.g. `llamatune merge` output) or a run, atomically, holding
    the lock on `out` so that a second export into the same file stops at once instead of interleaving; and
    `out` with the suffix `.export_report.json` beside it (see `export_report`).

    Args:
        tokenizer: The tokenizer to embed instead of `source`'s own (a run's, whose chat template is the trained one).
        weights, config: Where the tensors come from and the model's config, instead of `source`'s own files (a
            run's base with its adapter merged on the fly).

    Raises:
        LlamatuneError: For a non-Llama model, a damaged file in `source`, an output that exists or cannot be
            written, another process writing it, or a tokenizer llama.cpp does not reproduce.
    """
    from llamatune import lock, strictjson

    report_path = out.with_name(out.stem + ".export_report.json")
    check_output(out, "--out")  # before the lock, which creates out's parent folders
    check_output(report_path, "--out")
    with lock.hold(out, "exporting"):
        check_output(out, "--out")  # again: an export that finished while we waited wrote it
        report = _write_gguf(source, out, quant, say, tokenizer, weights, config)
        strictjson.write(report_path, report)
    _say_report(say, out, report, report_path)
    return out


def _say_report(say: Callable[[str], None], out: Path, report: dict, report_path: Path) -> None:
    from llamatune.artifacts.export_report import summary_line

    say(f"wrote {out} ({quant_label(report['quant'])}: {summary_line(report)})")
    if not report["tokenizer"]["checked"]:
        say(f"not checked in llama.cpp: {report['tokenizer']['why']}")
    for warning in report.get("quality", {}).get("warnings", []):
        say(f"warning: {warning}")
    say(f"report: {report_path}")


def checked_quant(quant: str | None) -> str:
    """`--quant` as given (any case; default f16), or a RecipeError naming the choices and the closest one."""
    import difflib

    from llamatune.errors import RecipeError

    kind = (quant or "f16").lower()
    if kind not in QUANTS:
        close = difflib.get_close_matches(kind.replace("-", "_"), QUANTS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError([f"--quant: {quant!r}; choose one of {', '.join(QUANTS)}{hint}"])
    return kind


def quant_label(quant: str) -> str:
    return quant.upper() if quant != "f16" else "F16"


def _write_gguf(source: Path, out: Path, quant: str, say: Callable[[str], None] = print, tokenizer=None,
                weights=None, config=None) -> dict:
    """Writes the GGUF file through `.NAME.partial` beside it, one tensor (a block of rows) at a time, checks it
    (tokenizer in llama.cpp, quality against the source), and renames it when both are done. The caller holds the
    lock on `out`, so the fixed name is ours alone, and a partial file a killed export left is simply overwritten.

    Args:
        weights: Where the tensors come from (weights.py); default `source`'s own safetensors.

    Returns:
        The export report (file facts, tokenizer check, quality).
    """
    from llamatune.artifacts import export_report
    from llamatune.artifacts.gguf_io import GGUFStream
    from llamatune.artifacts.weights import FolderWeights

    if config is None:
        config, own = _open_config(source)
        tokenizer = own if tokenizer is None else tokenizer
    weights = weights or opened(partial(FolderWeights, source), source, "model", fix_for_model(source))
    plan = gguf_plan(config, weights)
    types = tensor_types([(name, shape) for name, _, shape in plan], config, quant)
    tmp = out.parent / f".{out.name}.partial"
    try:
        stream = GGUFStream(tmp)
        _add_hyperparameters(stream.writer, source, config, quant)
        add_tokenizer(stream.writer, tokenizer, config.vocab_size)
        for name, _, shape in plan:
            stream.declare(name, shape, types[name])
        stream.begin()
        with Phase(say, f"export: {quant_label(quant)} tensors", len(plan), "tensors") as phase:
            for name, hf, shape in plan:
                stream.write(name, _chunks(weights, hf, name, shape, types[name], config))
                phase.advance(note=f"{name} {types[name]}")
        stream.close()
        with Phase(say, "export: checking the tokenizer in llama.cpp"):
            report = {"source": str(source), "quant": quant, "file": export_report.file_facts(tmp),
                      "tokenizer": export_report.check_tokenizer(tmp, tokenizer)}
        with Phase(say, "export: measuring quality against the source"):
            report["quality"] = export_report.quality(tmp, config, weights, tokenizer, source, say)
        os.replace(tmp, out)
        return report
    finally:
        if tmp.exists():
            tmp.unlink()


def hf_to_gguf_names(n_layers: int) -> dict[str, str]:
    """Hugging Face Llama weight name → llama.cpp tensor name, in the order llama.cpp's converter writes them."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{short}.weight" for hf, short in LAYER_TENSORS.items()})
    names.update({"model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"})
    return names


def gguf_plan(config, weights) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, Hugging Face name, numpy shape) of every tensor the GGUF holds, in file order; no output head
    when the embeddings are tied.

    Raises:
        LlamatuneError: If `weights` lacks a tensor a Llama model has (a damaged or foreign folder).
    """
    plan = []
    for hf, name in hf_to_gguf_names(config.num_hidden_layers).items():
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if not weights.has(hf):
            raise LlamatuneError(f"the model's weights have no {hf}, which a Llama model with {config.num_hidden_layers} "
                                 "layers has; the folder is damaged or not a Llama model")
        plan.append((name, hf, tuple(weights.shape(hf))))
    return plan


def _chunks(weights, hf: str, name: str, shape: tuple[int, ...], qtype: str, config):
    """The tensor's bytes in `qtype`, a block of rows at a time (whole heads for Q and K, which are permuted)."""
    import numpy as np

    from llamatune.artifacts import quants
    from llamatune.artifacts.tensors import CHUNK_ELEMENTS

    if len(shape) == 1:
        yield weights.get(hf).numpy().astype(np.float32 if qtype == "F32" else np.float16)
        return
    rows, cols = shape
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name.split(".")[-2])
    unit = rows // heads if heads else 1
    step = max(unit, (4 * CHUNK_ELEMENTS // cols) // unit * unit)
    for start in range(0, rows, step):
        block = weights.rows(hf, start, start + step).numpy()
        if heads:
            block = permute_rotary(block, block.shape[0] // unit)
        if qtype in ("F32", "F16"):
            yield block.astype(np.float32 if qtype == "F32" else np.float16)
        else:
            yield quants.quantize(block, qtype)


def tensor_types(shapes: list[tuple[str, tuple[int, ...]]], config, quant: str) -> dict[str, str]:
    """GGML type name per GGUF tensor name (from (name, shape) pairs): f16 keeps norms in F32 and the rest in F16;
    a quant type follows llama.cpp's own per-tensor mix for Llama models."""
    if quant == "f16":
        return {name: "F32" if len(shape) == 1 or name.endswith("norm.weight") else "F16" for name, shape in shapes}
    from llamatune.artifacts import quants

    return quants.tensor_types([(name, tuple(shape)) for name, shape in shapes], quant, config.num_hidden_layers,
                               tied=not any(name == "output.weight" for name, _ in shapes))


def _open_config(source: Path):
    """(config, tokenizer) of a Llama model folder; a damaged file is named, with how to remake it."""
    from transformers import AutoConfig, AutoTokenizer

    fix = fix_for_model(source)
    config = opened(partial(AutoConfig.from_pretrained, source), source, "model", fix)
    if config.model_type != "llama":
        raise LlamatuneError(f"{source}: model type {config.model_type!r}; GGUF export supports Llama-architecture models")
    tokenizer = opened(partial(AutoTokenizer.from_pretrained, source), source, "tokenizer", fix)
    return config, tokenizer


def _add_hyperparameters(writer, source: Path, config, quant: str) -> None:
    import gguf

    writer.add_name(source.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))


def permute_rotary(w, n_heads: int):
    """Rows of a Q or K projection [n_heads * head_dim, ...] (or a LoRA B of one) in llama.cpp's rotary order."""
    # HF keeps each head's rotary halves as [first half | second half]; llama.cpp interleaves them.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w, n_heads: int):
    """The inverse of permute_rotary: rows of a GGUF's Q or K projection back in Hugging Face's order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_ollama(source: Path, folder: Path, quant: str = "f16", say: Callable[[str], None] = print, tokenizer=None,
                  weights=None, config=None) -> Path:
    """Writes `folder` with model.gguf, a Modelfile and export_report.json (staging folder + rename, under the
    lock on `folder`), and prints the create command; `tokenizer`, `weights` and `config` as for export_gguf."""
    import shutil

    from transformers import AutoTokenizer

    from llamatune import lock, strictjson

    check_output(folder, "--out")
    with lock.hold(folder, "exporting"):
        check_output(folder, "--out")
        if tokenizer is None:
            tokenizer = opened(partial(AutoTokenizer.from_pretrained, source), source, "tokenizer", fix_for_model(source))
        from llamatune.artifacts.export_report import run_of
        from llamatune.artifacts.modelfile import trained_system

        modelfile = ollama_modelfile(tokenizer, "./model.gguf", system=trained_system(run_of(source)))  # fails first
        staging = folder.parent / f".{folder.name}.partial"  # ours alone while we hold the lock
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            report = _write_gguf(source, staging / "model.gguf", quant, say, tokenizer, weights, config)
            (staging / "Modelfile").write_text(modelfile)
            strictjson.write(staging / "export_report.json", report)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _say_report(say, folder / "model.gguf", report, folder / "export_report.json")
    say(f"ollama create {ollama_name(source)} -f {folder.resolve() / 'Modelfile'}")
    return folder
