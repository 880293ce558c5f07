"""`llamatune plan`: how much memory a recipe needs on a device, before loading any weights.

The estimate adds up, from the model's config.json and the recipe's data:
  weights     frozen base in its storage dtype (nf4: 0.5 byte/param + block scales; embeddings stay)
  adapter     LoRA parameters, their gradients and AdamW state (fp32; 8-bit optimizers: 2 bytes of state)
  activations tensors autograd keeps for backward, per token per layer (counted below), for the
              largest micro-batch the data can form; with gradient checkpointing only layer inputs
              plus one layer being recomputed
  logits      the loss's chunk of vocabulary logits (the chunked head) or all label-token logits
  runtime     on CPU, the process's resident memory after importing torch & co (measured, not guessed);
              on a GPU, the CUDA context and allocator reserve
  temporaries on CPU, what lives on top of the saved activations during the largest step (intermediates
              autograd does not keep, gradient buffers, the allocator's free spans): a measured ratio
The per-token counts were checked against torch's saved-tensor hooks on SmolLM2-135M (within 2%), and
the total against measured peak RSS (README, "Performance").
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from llamatune.memory import training_uses_tcmalloc
from llamatune.train.loss import CHUNK_ELEMENTS

GiB = 2**30
# Peak RSS minus every other part, over the activations part, under tcmalloc on a 2-core AVX2 CPU in fp32:
# 0.52 (quickstart, LoRA, 800-token micro-batches) and 0.56 (legal/qlora, nf4, 1,112 tokens) when fit; with
# the fused LoRA layers (fewer saved tensors), 0.65 on the quickstart and 0.38 on bench_vs_hf's 1,680-token
# batch, both totals within 8%. Not derived: the saved tensors themselves match the model within 1%.
# glibc's malloc fragments far more (+40-70% RSS).
CPU_TEMPORARIES = 0.55


@dataclass(frozen=True)
class Device:
    """A training device: its memory and whether it computes bf16 natively."""

    name: str
    memory_gib: float
    bf16: bool
    gpu: bool = True


DEVICES = {d.name: d for d in (
    Device("a100-40gb", 40, True), Device("a100-80gb", 80, True), Device("h100-80gb", 80, True),
    Device("h200-141gb", 141, True), Device("l4-24gb", 24, True), Device("a10g-24gb", 24, True),
    Device("rtx4090-24gb", 24, True), Device("rtx3090-24gb", 24, True), Device("t4-16gb", 16, False),
    Device("v100-16gb", 16, False),
)}


@dataclass
class Plan:
    """A memory estimate (bytes by part) and a suggested micro-batch / accumulation."""

    device: Device
    precision: str
    parts: dict = field(default_factory=dict)
    tokens_per_micro_batch: int = 0
    suggestion: tuple[int, int] | None = None  # (micro_batch_size, grad_accum) keeping the effective batch
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def this_machine() -> Device:
    """The CPU this runs on: its physical memory; bf16 when the instructions exist (see model.training_precision)."""
    import os

    from llamatune.model import training_precision

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        memory = float("nan")
    import torch

    bf16 = not torch.cuda.is_available() and training_precision("auto") == "bf16"
    return Device("cpu", round(memory, 1), bf16, gpu=False)


def shape(config) -> dict:
    """The sizes the estimate needs, from a transformers config of a Llama-family model."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    return {"h": h, "heads": heads, "q": heads * head_dim, "kv": kv, "i": config.intermediate_size,
            "layers": config.num_hidden_layers, "vocab": config.vocab_size,
            "tied": bool(getattr(config, "tie_word_embeddings", False))}


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of one decoder layer."""
    h, q, kv, i = s["h"], s["q"], s["kv"], s["i"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def activation_bytes_per_token_layer(s: dict, act_bytes: int, dropout: bool, targets: set[str], r: int,
                                     quantized: bool = False) -> float:
    """Bytes autograd saves per token per decoder layer, with llamatune's lean blocks and LoRA layers (fused.py).

    In the compute dtype: both norms' inputs (2h); the normed input of q/k/v and of gate/up, where an adapter
    reads it (h each); the rotated q and attention's output, which o_proj reads in place (2q); the rotated k
    and v (2kv); gate and up (2i; their product is recomputed, except over a 4/8-bit base, whose down projection
    keeps it: one more i); each adapter's [tokens x r] product. In fp32:
    one scale per norm, one log-sum-exp per head. LoRA dropout adds each adapter's boolean mask (1 byte per
    input element). Matches torch's saved-tensor hooks on SmolLM2-135M within 1% in fp32 and bf16, with and
    without dropout, nf4 included (tests/test_plan_bench.py checks the tiny model within 25%).
    """
    h, q, kv, i = s["h"], s["q"], s["kv"], s["i"]
    reads_normed = (bool(targets & {"q_proj", "k_proj", "v_proj"}) + bool(targets & {"gate_proj", "up_proj"})) * h
    kept_product = i if quantized and "down_proj" in targets else 0
    size = act_bytes * (2 * h + reads_normed + 2 * q + 2 * kv + 2 * i + kept_product + r * len(targets)) + 4 * (2 + s["heads"])
    if dropout:
        size += sum(n_in for name, (n_in, _) in linear_shapes(s).items() if name in targets)
    return size


def estimate(recipe, config, device: Device, tokens_per_row: int, runtime_bytes: int) -> Plan:
    """The memory plan of `recipe` for a model with `config` on `device`.

    Args:
        tokens_per_row: the longest row the data forms (max_length when packing, else the longest example).
        runtime_bytes: resident memory of the process before the model loads (CPU), or the CUDA context.
    """
    from llamatune.model import resolve_dtype, training_precision

    s = shape(config)
    cfg = recipe.train
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.bf16 else "fp32")
    if not device.gpu and cfg.precision == "auto":
        precision = training_precision("auto")
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    plan = Plan(device, precision)
    dtype = resolve_dtype(recipe.model.dtype, precision)
    wbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]

    # ---- weights ----
    per_layer = linear_shapes(s)
    linear_params = s["layers"] * sum(a * b for a, b in per_layer.values())
    embed = s["vocab"] * s["h"] * (1 if s["tied"] else 2)
    norms = s["layers"] * 2 * s["h"] + s["h"]
    mode = recipe.quantization.mode
    if mode == "nf4":  # 4 bits + an fp32 absmax per 64 weights (double quant: 8 bits + a shared fp32 per 256 blocks)
        scale_bits = (8 + 32 / 256) / 64 if recipe.quantization.double_quant else 32 / 64
        linear = linear_params * (4 + scale_bits) / 8
    elif mode == "int8":
        linear = linear_params * (1 + 4 / s["h"])
    else:
        linear = linear_params * wbytes
    plan.parts["weights"] = int(linear + (embed + norms) * wbytes)
    if not device.gpu and act_bytes == 2 and wbytes == 4 and mode == "none":
        plan.parts["autocast weight copies"] = int(linear_params * 2)  # bf16 copies cached during each forward

    # ---- adapter: params + grads + optimizer state ----
    targets = set(per_layer) if recipe.lora.target_modules == "all-linear" else set(recipe.lora.target_modules)
    r = recipe.lora.r
    lora = s["layers"] * sum(r * (a + b) for name, (a, b) in per_layer.items() if name in targets)
    state = 2 if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    plan.parts["adapter + grads + optimizer"] = int(lora * (4 + 4 + state))

    # ---- activations ----
    tokens = cfg.micro_batch_size * tokens_per_row
    plan.tokens_per_micro_batch = tokens
    per_token_layer = activation_bytes_per_token_layer(s, act_bytes, recipe.lora.dropout > 0, targets, r, mode != "none")
    if cfg.gradient_checkpointing:
        plan.parts["activations"] = int(tokens * (s["layers"] * s["h"] * act_bytes + per_token_layer))
    else:
        plan.parts["activations"] = int(tokens * s["layers"] * per_token_layer)
    # ---- logits: the chunked head holds one chunk and its softmax; unchunked, all label positions ----
    plan.parts["logits (chunked)"] = int(2 * CHUNK_ELEMENTS * 4)  # a chunk and its softmax
    plan.parts["runtime"] = runtime_bytes
    if not device.gpu:
        plan.parts["temporaries"] = int(CPU_TEMPORARIES * plan.parts["activations"])
        if sys.platform.startswith("linux") and not training_uses_tcmalloc():
            plan.notes.append("training will run on the system allocator, whose fragmentation can add ~70% to the peak "
                              "on Linux: install libtcmalloc-minimal4 (llamatune uses it unless LLAMATUNE_ALLOCATOR=system) or expect more")
    plan.suggestion = _suggest(plan, recipe, tokens_per_row, per_token_layer, s)
    if device.gpu and precision == "bf16" and not device.bf16:
        plan.notes.append(f"{device.name} has no native bf16: set train.precision: fp16 or fp32")
    return plan


def _suggest(plan: Plan, recipe, tokens_per_row: int, per_token_layer: float, s: dict) -> tuple[int, int] | None:
    """Largest power-of-two micro-batch that fits in 90% of the device, same effective batch."""
    cfg = recipe.train
    effective = cfg.micro_batch_size * cfg.grad_accum
    per_activation_byte = 1 + (CPU_TEMPORARIES if not plan.device.gpu else 0)  # temporaries grow with the batch
    fixed = plan.total - plan.parts["activations"] - plan.parts.get("temporaries", 0)
    budget = 0.9 * plan.device.memory_gib * GiB - fixed
    row = per_activation_byte * tokens_per_row * (s["layers"] * s["h"] * 2 + per_token_layer if cfg.gradient_checkpointing
                                                  else s["layers"] * per_token_layer)
    if math.isnan(budget) or budget < row:
        return None
    micro = 1
    while micro * 2 <= effective and (micro * 2) * row <= budget:
        micro *= 2
    return micro, math.ceil(effective / micro)


def runtime_resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere) once torch, transformers and peft are imported:
    imported here, so `plan` and `bench` measure the same runtime for the same recipe, whatever each imported before."""
    import peft  # noqa: F401  (imports torch and transformers' modeling code, as training does)
    from transformers import AutoConfig  # noqa: F401

    import llamatune.train.loop  # noqa: F401  (and everything the training loop imports, which bench has loaded)

    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def show(plan: Plan, console) -> None:
    """The plan as a table: parts in GiB, the total against the device, and the suggestion."""
    from rich.table import Table

    table = Table(title=f"memory plan on {plan.device.name} ({plan.device.memory_gib:g} GiB), precision {plan.precision}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for name, size in plan.parts.items():
        table.add_row(name + (f" ({plan.tokens_per_micro_batch:,} tokens per micro-batch)" if name == "activations" else ""),
                      f"{size / GiB:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{plan.total / GiB:.2f}[/]")
    console.print(table)
    share = plan.total / (plan.device.memory_gib * GiB) if plan.device.memory_gib == plan.device.memory_gib else float("nan")
    verdict = "fits" if share <= 0.9 else "does NOT fit" if share > 1 else "fits with little headroom"
    console.print(f"{verdict}: {share:.0%} of {plan.device.name}")
    if plan.suggestion:
        micro, accum = plan.suggestion
        console.print(f"suggested: train.micro_batch_size={micro} train.grad_accum={accum} (same effective batch)")
    else:
        console.print("no micro-batch fits: enable train.gradient_checkpointing, quantization.mode: nf4, or lower data.max_length")
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}")
