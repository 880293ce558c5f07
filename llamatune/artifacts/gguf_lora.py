"""`llamatune export RUN --format gguf-lora | gguf-base | ollama-lora`: a run's LoRA adapter as a GGUF LoRA file that
llama.cpp (`--lora`) and Ollama (`ADAPTER`) apply on top of the base model's GGUF, and that base GGUF, written once.

llama.cpp adds, for every adapted weight W (build_lora_mm in its src/llama-graph.cpp):
    y = W x + (alpha / r) · B (A x)      alpha: the file's adapter.lora.alpha, one per file; r: the columns of this B
peft scales each module by alpha/r, by alpha/sqrt(r) with rslora, and alpha_pattern/rank_pattern give modules their
own alpha and r. Where peft's scale differs from llama.cpp's, the ratio is multiplied into B, so llama.cpp's one
formula reproduces peft's for any such adapter.

Tensors: `blk.N.<name>.weight.lora_a` is peft's lora_A [r, in] and `.lora_b` its lora_B [out, r] (numpy row-major
shapes; ggml lists them reversed). The base GGUF holds Q and K rows in llama.cpp's rotary order (export.py), and B's
rows are output rows, so the B of q_proj and k_proj is permuted the same way; A works on the input side and is not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from llamatune.artifacts.export import LAYER_TENSORS, permute_rotary
from llamatune.artifacts.files import FIX_RUN, check_output, opened
from llamatune.errors import LlamatuneError, RecipeError

RUN_FORMATS = ("gguf-lora", "gguf-base", "ollama-lora")
# f32, llama.cpp's own converter's default too: an adapter is ~1% of the model, and f16 rounds A and B separately.
# Measured on the tiny test model with rsLoRA, f16 base, vs transformers: f32 adapter 8.4e-4 relative max logit
# error, greedy tokens equal; f16 adapter 2.4e-3, one greedy token flipped.
ADAPTER_DTYPE = "f32"
_MERGE_INSTEAD = "merge it instead and export the merged model: llamatune merge RUN, then llamatune export RUN/merged"



def export_run(run: Path, fmt: str, quant: str | None, out: Path | None, base: Path | None,
               say: Callable[[str], None] = print) -> Path:
    """Dispatches `llamatune export RUN --format gguf-lora|gguf-base|ollama-lora` with its defaults (inside RUN).

    Raises:
        RecipeError: For arguments that do not fit the format or a folder that is not a run directory.
        LlamatuneError: For an adapter llama.cpp cannot apply, a damaged run, or an output that exists.
    """
    from llamatune.artifacts.files import run_dir_problem

    if not run.is_dir() or not ((run / "recipe.yaml").exists() or (run / "adapter").exists()):
        raise RecipeError([f"{run}: --format {fmt} takes a run directory (recipe.yaml + adapter/), the folder llamatune "
                           "train writes; for a model folder use --format gguf or ollama"])
    if quant is not None and (fmt == "gguf-lora" or base is not None):
        raise RecipeError([f"--quant {quant}: sets the type of a base GGUF being written (gguf-base, ollama-lora without "
                           f"--base); the adapter is always written in {ADAPTER_DTYPE} (it is small, and rounding it costs "
                           "accuracy)"])
    if base is not None and fmt == "gguf-base":
        raise RecipeError(["--base: gguf-base writes the base; --base names an existing one, for gguf-lora or ollama-lora"])
    if base is not None and not base.is_file():
        raise RecipeError([f"--base {base}: no such file; write the base GGUF once with llamatune export {run} "
                           "--format gguf-base"])
    problem = run_dir_problem(run)
    if problem:
        raise LlamatuneError(f"{problem}; {FIX_RUN}")
    quant = quant or "f16"
    if fmt == "gguf-base":
        return export_base(run, out or run / f"base-{quant}.gguf", quant, say)
    if fmt == "ollama-lora":
        return export_ollama_lora(run, out or run / "ollama-lora", quant, base, say)
    return export_adapter(run, out or run / "adapter.gguf", base, say)


def export_adapter(run: Path, out: Path, base: Path | None = None, say: Callable[[str], None] = print) -> Path:
    """Writes RUN's adapter as a GGUF LoRA file (`.NAME.partial` + rename, under the lock on `out`) and prints how to
    use it with llama.cpp and Ollama.

    Args:
        base: A base GGUF to check the adapter against (architecture and every adapted tensor's shape).

    Raises:
        LlamatuneError: If the adapter uses something llama.cpp cannot apply (each one named, with the way out),
            `base` does not fit it, or `out` exists or is being written by another process.
    """
    from llamatune import lock

    check_output(out, "--out")
    recipe, folder = _recipe(run), base_folder(run, say)
    alpha, pairs = adapter_tensors(run, _config(folder))
    if base is not None:
        check_base(base, pairs)
    with lock.hold(out, "exporting"):
        check_output(out, "--out")
        _write_adapter(out, run.name, alpha, pairs)
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(pairs) // 2} LoRA pairs, {ADAPTER_DTYPE})")
    if recipe.quantization.mode != "none":
        say(f"trained on a {recipe.quantization.mode} base: llama.cpp applies it to the base GGUF's weights, as "
            "llamatune merge does to the full-precision ones")
    _say_usage(run, out, base, say)
    return out


def export_base(run: Path, out: Path, quant: str, say: Callable[[str], None] = print) -> Path:
    """Writes the run's base model (model.path of RUN/recipe.yaml, a builtin found in llamatune's cache) as one GGUF,
    with the run's tokenizer and trained chat template, through export.py's writer. Written once, it serves every
    adapter trained on that base."""
    from llamatune.artifacts.export import export_gguf
    from llamatune.evaluate.target import run_tokenizer

    check_output(out, "--out")
    folder = base_folder(run, say)
    export_gguf(folder, out, quant, say, tokenizer=run_tokenizer(run))
    say(f"pair it with the adapter: llamatune export {run} --format gguf-lora --base {out}")
    return out


def export_ollama_lora(run: Path, folder: Path, quant: str, base: Path | None = None,
                       say: Callable[[str], None] = print) -> Path:
    """Writes `folder`: adapter.gguf and a Modelfile (FROM the base, ADAPTER ./adapter.gguf, the trained chat
    template and stop token of export.ollama_modelfile). Without `base`, the base GGUF is written into the folder
    as base.gguf; with it, the Modelfile names that file by its absolute path. Staging folder + rename, under the
    lock on `folder`; an existing `folder` is never overwritten."""
    import shutil

    from llamatune import lock, strictjson
    from llamatune.artifacts.export import _write_gguf
    from llamatune.artifacts.modelfile import ollama_modelfile, ollama_name
    from llamatune.evaluate.target import run_tokenizer

    check_output(folder, "--out")
    base_dir = base_folder(run, say)
    alpha, pairs = adapter_tensors(run, _config(base_dir))
    if base is not None:
        check_base(base, pairs)
    tokenizer = run_tokenizer(run)
    from llamatune.artifacts.modelfile import trained_system

    modelfile = ollama_modelfile(tokenizer, str(base.resolve()) if base else "./base.gguf", "./adapter.gguf",
                                 system=trained_system(run))  # fails before any big write
    with lock.hold(folder, "exporting"):
        check_output(folder, "--out")
        staging = folder.parent / f".{folder.name}.partial"  # ours alone while we hold the lock
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _write_adapter(staging / "adapter.gguf", run.name, alpha, pairs)
            if base is None:
                report = _write_gguf(base_dir, staging / "base.gguf", quant, say, tokenizer)
                strictjson.write(staging / "export_report.json", report)
            (staging / "Modelfile").write_text(modelfile)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    written = "adapter.gguf, Modelfile" + ("" if base else f", base.gguf ({quant})")
    say(f"wrote {folder} ({written})")
    say(f"ollama create {ollama_name(run)} -f {folder.resolve() / 'Modelfile'}")
    return folder


def base_folder(run: Path, say: Callable[[str], None] = print) -> Path:
    """The local folder of the run's base model: model.path of RUN/recipe.yaml resolved as training did (a builtin
    name → llamatune's cache, a .gguf → its converted copy, a hub id → its Hugging Face cache snapshot).

    Raises:
        RecipeError: If model.path no longer resolves (a folder moved away), naming RUN/recipe.yaml.
        LlamatuneError: If a hub id is not in the Hugging Face cache.
    """
    from llamatune import model as models

    recipe = _recipe(run)
    try:
        ref = models.resolve(recipe.model, say)
    except RecipeError as exc:
        raise RecipeError([f"{p} (the run's base, needed for its GGUF)" for p in exc.problems],
                          source=str(run / "recipe.yaml")) from None
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, revision=recipe.model.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise LlamatuneError(f"{run / 'recipe.yaml'}: the base {ref!r} is not in the Hugging Face cache; download it "
                             f"(huggingface-cli download {ref}) and export again") from None


def adapter_tensors(run: Path, config) -> tuple[float, list[tuple]]:
    """(adapter.lora.alpha, [(gguf name, float32 array)]) for RUN/adapter: A and B of each adapted layer, B scaled to
    peft's scale and Q/K-permuted.

    Args:
        config: The base model's transformers config (layer and head counts).

    Raises:
        LlamatuneError: Listing everything in the adapter llama.cpp cannot apply, each with why.
    """
    import torch

    from llamatune.artifacts import lora

    folder = run / "adapter"
    settings, state = lora.read(run)
    found = lora.problems(folder, settings, state, config)
    if found:
        raise LlamatuneError("the adapter cannot be written as a llama.cpp LoRA:\n" + "\n".join(f"  - {p}" for p in found)
                             + f"\n{_MERGE_INSTEAD}")
    alpha = float(settings["lora_alpha"])
    pairs = []
    for key in sorted(state, key=_order):
        layer, module, side = lora.KEY.match(key).groups()
        w = state[key].to(torch.float32).numpy()  # A [r, in], B [out, r]
        short = LAYER_TENSORS[module]
        if side == "B":
            rank = w.shape[1]
            llama_cpp_scale = alpha / rank if alpha else 1.0  # llama.cpp reads alpha 0 as "no scaling"
            w = w * (lora.peft_scale(settings, f"model.layers.{layer}.{module}", rank) / llama_cpp_scale)
            if short in ("attn_q", "attn_k"):
                w = permute_rotary(w, config.num_attention_heads if short == "attn_q" else config.num_key_value_heads)
        pairs.append((f"blk.{layer}.{short}.weight.lora_{side.lower()}", w))
    return alpha, pairs


def _order(key: str) -> tuple:
    from llamatune.artifacts.lora import KEY

    layer, module, side = KEY.match(key).groups()
    return int(layer), list(LAYER_TENSORS).index(module), side


def check_base(base: Path, pairs: list) -> None:
    """Fails unless `base` is a Llama model GGUF with every tensor the adapter adapts, in the adapter's shapes (what
    llama.cpp would otherwise refuse at load time with "incorrect shape (hint: maybe wrong base model?)")."""
    import gguf

    from llamatune.artifacts.files import gguf_problem

    try:
        reader = gguf.GGUFReader(str(base))  # memory-mapped: reads the header and tensor table only
    except (ValueError, OSError) as exc:
        raise LlamatuneError(f"--base {base}: {gguf_problem(base, exc)}") from None
    fields = {name: reader.fields[name].contents() for name in ("general.architecture", "general.type")
              if name in reader.fields}
    if fields.get("general.architecture") != "llama" or fields.get("general.type") == "adapter":
        raise LlamatuneError(f"--base {base}: a {fields.get('general.type', 'model')} of architecture "
                             f"{fields.get('general.architecture')!r}, not a Llama model GGUF; give the base model's GGUF "
                             "(llamatune export RUN --format gguf-base)")
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: [in, out]
    wanted = {}
    for name, w in pairs:
        target, side = name.rsplit(".lora_", 1)
        wanted.setdefault(target, [0, 0])[side == "b"] = w.shape[1] if side == "a" else w.shape[0]
    wrong = [f"{t} is {shapes.get(t, 'missing')}, the adapter needs {tuple(s)}" for t, s in wanted.items()
             if shapes.get(t) != tuple(s)]
    if wrong:
        raise LlamatuneError(f"--base {base} is not the base this adapter was trained on: {'; '.join(wrong[:3])}; give the "
                             "run's base (llamatune export RUN --format gguf-base)")


def _write_adapter(out: Path, name: str, alpha: float, pairs: list) -> None:
    """The GGUF LoRA file: general.type adapter, adapter.type lora, adapter.lora.alpha, the A/B pairs in
    ADAPTER_DTYPE. Through `.NAME.partial` and a rename; the caller holds the lock on `out`."""
    import gguf
    import numpy as np

    tmp = out.parent / f".{out.name}.partial"
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")  # llama.cpp refuses an adapter whose architecture is not the base's
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name)
        dtype = {"f32": np.float32, "f16": np.float16}[ADAPTER_DTYPE]
        for tensor_name, w in pairs:
            writer.add_tensor(tensor_name, np.ascontiguousarray(w, dtype=dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _say_usage(run: Path, adapter: Path, base: Path | None, say: Callable[[str], None]) -> None:
    """The exact llama.cpp and Ollama commands for the pair; the base GGUF is the given one, else RUN's default."""
    known = base or next((p for p in (run / "base-f16.gguf", run / "base-q8_0.gguf") if p.is_file()), None)
    shown = known or "BASE.gguf"
    if known is None:
        say(f"the base GGUF it applies to, once: llamatune export {run} --format gguf-base  (writes {run / 'base-f16.gguf'})")
    say(f"llama.cpp: llama-cli -m {shown} --lora {adapter}")
    say(f"           llama-server -m {shown} --lora {adapter}")
    say(f"Ollama:    llamatune export {run} --format ollama-lora --base {shown}  (then ollama create)")


def _recipe(run: Path):
    from llamatune.recipe import load_recipe

    return load_recipe(run / "recipe.yaml", saved=True)


def _config(folder: Path):
    """The transformers config of the base model folder (layer and head counts, architecture)."""
    from functools import partial

    from transformers import AutoConfig

    from llamatune.artifacts.files import fix_for_model

    return opened(partial(AutoConfig.from_pretrained, folder), folder, "model", fix_for_model(folder))
