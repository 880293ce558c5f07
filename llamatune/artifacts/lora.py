"""A run's LoRA adapter as plain tensors: which weights it adapts, its A and B, and the scale peft gives each, so that
merge and export can add `scale · B @ A` to one base weight at a time (and llama.cpp's adapter file can be written).

Only an adapter whose whole effect is `W + scale · B @ A` on decoder-layer projections can be applied this way;
`problems` names every setting that does more (DoRA's magnitudes, saved whole modules, trained tokens, biases...).
Merge then falls back to peft's own `merge_and_unload` on the whole model; the GGUF LoRA export refuses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from llamatune.artifacts.files import FIX_RUN, opened
from llamatune.errors import LlamatuneError

if TYPE_CHECKING:
    import torch

KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
# Hugging Face Llama layer modules an adapter may adapt (llama.cpp adapts the same ones).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# adapter_config.json settings whose effect is more than W + scale·BA on those layers.
REFUSED = {
    "use_dora": "DoRA rescales every adapted weight by a learned magnitude vector after adding BA; llama.cpp's LoRA "
                "only adds scale·BA, so the adapter would run without its magnitudes",
    "modules_to_save": "it holds whole trained copies of layers, which replace the base's; a llama.cpp adapter can "
                       "only add low-rank updates",
    "trainable_token_indices": "it holds trained embedding rows that replace the base's; a llama.cpp adapter cannot",
    "lora_bias": "lora_B has a bias, which llama.cpp's LoRA has no tensor for",
    "use_qalora": "QA-LoRA pools the input before A; llama.cpp feeds A the plain input",
    "layer_replication": "it duplicates base layers, which an adapter file cannot do to the base GGUF",
    "target_parameters": "it adapts raw parameters rather than linear layers; llama.cpp has no slot for them",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not written by this export",
}


def read(run: Path) -> tuple[dict, dict]:
    """(adapter_config.json, the adapter's tensors) of RUN/adapter; a damaged file is named, with how to fix it."""
    from safetensors.torch import load_file

    folder = run / "adapter"
    settings = opened(lambda: json.loads((folder / "adapter_config.json").read_text()), folder, "adapter", FIX_RUN)
    state = opened(lambda: load_file(folder / "adapter_model.safetensors"), folder, "adapter", FIX_RUN)
    return settings, state


def problems(folder: Path, settings: dict, state: dict, config) -> list[str]:
    """Everything in the adapter that is more than `W + scale · B @ A` on decoder-layer projections, each with why."""
    from peft import LoraConfig

    where = folder / "adapter_config.json"
    found = []
    if settings.get("peft_type") != "LORA":
        found.append(f"{where}: peft_type {settings.get('peft_type')!r}, not LORA")
    if config.model_type != "llama":
        found.append(f"the base is a {config.model_type!r} model; GGUF export supports Llama-architecture models")
    for key, why in REFUSED.items():
        if settings.get(key):
            found.append(f"{where}: {key} is set ({settings[key]!r}): {why}")
    init = str(settings.get("init_lora_weights"))
    if init.startswith(("pissa", "olora", "corda", "loftq")):
        found.append(f"{where}: init_lora_weights {init!r} changed the base weights when training began, so the adapter "
                     "fits only that changed base, not the base GGUF (convert it with peft's "
                     "path_initial_model_for_weight_conversion first)")
    if settings.get("bias", "none") != "none":
        found.append(f"{where}: bias {settings['bias']!r}: the base's biases were trained and saved with the adapter, "
                     "and a llama.cpp adapter cannot replace them")
    # Any other LoRA variant peft knows (its config fields tagged as variants) changes the forward pass too.
    for field in dataclasses.fields(LoraConfig):
        if field.metadata.get("is_lora_variant") and field.name not in REFUSED and settings.get(field.name):
            found.append(f"{where}: {field.name} is set: a LoRA variant whose forward pass is not W + scale·BA")
    if settings.get("init_lora_weights") in next((f.metadata.get("lora_variants", []) for f in dataclasses.fields(
            LoraConfig) if f.name == "init_lora_weights"), []):
        found.append(f"{where}: init_lora_weights {settings['init_lora_weights']!r} is a LoRA variant whose forward "
                     "pass is not W + scale·BA")
    for key in sorted(state):
        m = KEY.match(key)
        if not m or m.group(2) not in PROJECTIONS or int(m.group(1)) >= config.num_hidden_layers:
            found.append(f"{folder / 'adapter_model.safetensors'}: tensor {key}: not a LoRA A/B of a layer llama.cpp "
                         f"adapts ({', '.join(PROJECTIONS)} of the decoder layers)")
        elif key.replace(f".lora_{m.group(3)}.", f".lora_{'BA'[m.group(3) == 'B']}.") not in state:
            found.append(f"{folder / 'adapter_model.safetensors'}: tensor {key} has no partner lora_A/lora_B")
    return found


def peft_scale(settings: dict, module: str, rank: int) -> float:
    """The scale peft gives `module` (its name in the base model): alpha/r or alpha/sqrt(r), per-module alpha from
    alpha_pattern, matched by peft's own rule."""
    from peft.utils.other import get_pattern_key

    patterns = settings.get("alpha_pattern") or {}
    alpha = float(patterns.get(get_pattern_key(patterns.keys(), module), settings["lora_alpha"]))
    return alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank


@dataclasses.dataclass(frozen=True)
class Pair:
    """One adapted weight: A [r, in], B [out, r] in float32, and peft's scale."""

    a: "torch.Tensor"
    b: "torch.Tensor"
    scale: float

    def delta(self) -> "torch.Tensor":
        """scale · B @ A, in float32, the shape of the weight (what peft's merge adds)."""
        return (self.b @ self.a) * self.scale

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        """The adapter's contribution to the layer's output for input x, unmerged: scale · (x Aᵀ) Bᵀ."""
        return (x @ self.a.T) @ self.b.T * self.scale


class Deltas:
    """The LoRA pairs of RUN/adapter by the base weight they adapt (`model.layers.3.self_attn.q_proj.weight`).

    Raises (at construction):
        LlamatuneError: Through `opened`, for a damaged adapter file.
    """

    def __init__(self, run: Path, config):
        import torch

        self.folder = run / "adapter"
        self.settings, state = read(run)
        self.problems = problems(self.folder, self.settings, state, config)
        self.pairs: dict[str, Pair] = {}
        if self.problems:
            return
        for key in state:
            layer, module, side = KEY.match(key).groups()
            if side == "A":
                a = state[key].to(torch.float32)
                b = state[key.replace(".lora_A.", ".lora_B.")].to(torch.float32)
                name = f"model.layers.{layer}.{module}"
                self.pairs[f"{name}.weight"] = Pair(a, b, peft_scale(self.settings, name, a.shape[0]))

        for weight, pair in self.pairs.items():
            want = _projection_shape(config, weight.split(".", 3)[3].removesuffix(".weight"))
            if want and (pair.b.shape[0], pair.a.shape[1]) != want:
                raise does_not_fit(run, getattr(config, "_name_or_path", "") or "the base",
                                   f"{weight} is {tuple(want)} in the base, the adapter's B@A "
                                   f"{(pair.b.shape[0], pair.a.shape[1])}")

    def __contains__(self, weight: str) -> bool:
        return weight in self.pairs

    def merged(self, weight: str, tensor: "torch.Tensor") -> "torch.Tensor":
        """`tensor` (the base weight) plus its adapter's delta, in float32; the base tensor itself when not adapted."""
        import torch

        pair = self.pairs.get(weight)
        if pair is None:
            return tensor
        return tensor.to(torch.float32) + pair.delta()

    def merged_rows(self, weight: str, rows: "torch.Tensor", start: int) -> "torch.Tensor":
        """Rows [start, start + len(rows)) of the merged weight, from the same rows of the base weight."""
        import torch

        pair = self.pairs.get(weight)
        if pair is None:
            return rows
        return rows.to(torch.float32) + (pair.b[start:start + rows.shape[0]] @ pair.a) * pair.scale


def _projection_shape(config, module: str) -> tuple[int, int] | None:
    """(out, in) features of a decoder-layer projection in a Llama model of `config`."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inter = config.hidden_size, config.intermediate_size
    return {"self_attn.q_proj": (config.num_attention_heads * head, hidden),
            "self_attn.k_proj": (config.num_key_value_heads * head, hidden),
            "self_attn.v_proj": (config.num_key_value_heads * head, hidden),
            "self_attn.o_proj": (hidden, config.num_attention_heads * head),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}.get(module)


def does_not_fit(run: Path, base: str, detail: str) -> LlamatuneError:
    """The error for an adapter whose tensors do not fit the base it is paired with (the base was replaced)."""
    return LlamatuneError(f"the adapter in {run / 'adapter'} does not fit the base model {base} ({detail}); was the base "
                          f"model (model.path in {run / 'recipe.yaml'}) replaced since training? Point model.path at "
                          "the model the run was trained on")
