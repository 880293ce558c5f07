"""Load a base model (builtin | local folder | .gguf | hub id), optionally quantize it, wrap it in LoRA.

Heavy imports (torch, transformers, peft, bitsandbytes) happen inside functions so that the CLI's
`--help` and `validate` stay instant.
"""

from __future__ import annotations

import difflib
import json
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

from llamatune.artifacts.files import fix_for_model, opened
from llamatune.catalog import BUILTINS, ensure_builtin, ensure_gguf
from llamatune.errors import LlamatuneError, RecipeError
from llamatune.schema import LoraSpec, ModelSpec, QuantizationSpec

if TYPE_CHECKING:
    import torch

SourceKind = Literal["builtin", "gguf", "folder", "hub"]
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def classify(path: str) -> SourceKind:
    """Says what kind of model reference `path` is, or raises RecipeError naming model.path.

    Order matters: an existing local file/folder wins over a builtin name or a hub id spelled the same.
    """
    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        return "gguf"
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise RecipeError([f"model.path: folder {local} has no config.json; point it at a Hugging Face model folder"])
        try:
            json.loads((local / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # cheap to find here, before a tokenizer or weight is read
            raise RecipeError([f"model.path: {local / 'config.json'} is not valid JSON ({exc}); the folder is damaged "
                               "or incompletely copied: copy it again"]) from None
        return "folder"
    if local.exists() and not local.is_file() and not local.is_dir():
        raise RecipeError([f"model.path: {local} is neither a file nor a folder"])
    if local.is_file():
        raise RecipeError([f"model.path: {local} is a file but not a .gguf model; give a .gguf file or the Hugging "
                           "Face folder that holds config.json and the weights"])
    if path in BUILTINS:
        return "builtin"
    if _HUB_ID.match(path) and not path.endswith(".gguf"):
        return "hub"
    close = difflib.get_close_matches(path, list(BUILTINS), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError([
        f"model.path: {path!r} is not an existing folder or .gguf file, a builtin model "
        f"({', '.join(BUILTINS)}), or a hub id like 'org/name'.{hint}"
    ])


def resolve(spec: ModelSpec, say: Callable[[str], None] = print) -> str:
    """Returns what `from_pretrained` should load: a hub id or a local folder (GGUF converted once)."""
    kind = classify(spec.path)
    if kind == "builtin":
        return str(ensure_builtin(spec.path, say))
    if kind == "gguf":
        return str(ensure_gguf(Path(spec.path).expanduser().resolve(), say, spec.dtype))
    if kind == "folder":
        return str(Path(spec.path).expanduser().resolve())
    return spec.path


def needs_conversion(spec: ModelSpec) -> bool:
    """True when resolve() would fetch or convert the model (a builtin not yet in the cache), or may (a .gguf)."""
    from llamatune.catalog import cached_path, is_cached

    kind = classify(spec.path)
    if kind == "builtin":
        return not is_cached(cached_path(spec.path))
    return kind == "gguf"  # its cache key is the file's sha256: reading the data twice costs less than hashing it twice


def load_tokenizer(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    """Loads the tokenizer and makes sure it can pad (the chat template is the data pipeline's concern)."""
    from transformers import AutoTokenizer

    load = partial(AutoTokenizer.from_pretrained, ref, revision=revision, trust_remote_code=trust_remote_code)
    try:
        # opened() names a damaged file when it finds one; otherwise the library's own error comes back here.
        tokenizer = opened(load, Path(ref), "tokenizer", fix_for_model(Path(ref))) if Path(ref).is_dir() else load()
    except (OSError, ValueError, KeyError) as exc:  # ValueError: no tokenizer files, or unreadable ones
        where = f"the folder {ref}" if Path(ref).is_dir() else repr(ref)
        raise LlamatuneError(f"could not load a tokenizer from {where}: {exc}. The folder needs the tokenizer's files "
                             "(tokenizer.json and tokenizer_config.json, as save_pretrained writes them)") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of both attention and labels, so any id is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_precision(requested: str) -> str:
    """Resolves train.precision `auto`: bf16 where it is computed natively, fp32 elsewhere.

    Emulated bf16 (an AVX2 laptop, a pre-Ampere GPU) is slower than fp32, so auto only picks it on a
    CUDA GPU that reports bf16 support or a CPU with AVX512-BF16 or AMX-BF16 instructions.
    """
    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


def _cpu_flags() -> set[str]:
    try:  # Linux; elsewhere (macOS, Windows) auto stays fp32
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def load_base(ref: str, spec: ModelSpec, quant: QuantizationSpec, device_map=None, sharded: bool = False,
              precision: str = "fp32"):
    """Loads the frozen base model, quantized with bitsandbytes when `quant.mode` is nf4 or int8.

    Args:
        precision: The resolved training precision; with model.dtype auto, bf16/fp16 training stores the
            frozen weights in that dtype (half the memory), anything else in float32.
        sharded: FSDP will shard the model: 4-bit weights are then stored in the compute dtype, the
            only way FSDP can flatten them together with the other parameters.
    """
    import torch
    from transformers import AutoModelForCausalLM

    # safetensors only: a pickled .bin checkpoint can execute code when loaded.
    dtype = resolve_dtype(spec.dtype, precision)
    kwargs: dict = {"dtype": getattr(torch, dtype), "revision": spec.revision, "use_safetensors": True,
                    "trust_remote_code": spec.trust_remote_code}
    if quant.mode != "none":
        kwargs["quantization_config"] = _bnb_config(quant, sharded, precision)
        if not sharded:  # FSDP places the shards itself
            kwargs["device_map"] = device_map or ({"": 0} if torch.cuda.is_available() else {"": "cpu"})
    local = Path(ref) if _has_safetensors(Path(ref)) else _hub_snapshot(ref, spec.revision)
    load = partial(_from_local, local, kwargs, ref) if local is not None else \
        partial(AutoModelForCausalLM.from_pretrained, ref, **kwargs)
    try:
        # A local folder's damaged file is named; what is left (an unreachable hub id) gets the message below.
        model = opened(load, Path(ref), "model", fix_for_model(Path(ref))) if Path(ref).is_dir() else load()
    except OSError as exc:
        raise LlamatuneError(
            f"could not load model {ref!r}: {exc}. For a hub id you need network access (or a filled "
            "HF cache with HF_HUB_OFFLINE=1); otherwise give a local folder or .gguf."
        ) from exc
    # The KV cache is useless in training, and with packed sequences it breaks example isolation.
    model.config.use_cache = False
    if quant.mode == "nf4":
        _disable_cpu_inference_packing(model)
    return model


def _has_safetensors(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def _hub_snapshot(ref: str, revision: str | None) -> Path | None:
    """A hub model's files in the Hugging Face cache (fetched there first when the hub is reachable): its configs
    and the safetensors files its index names, nothing else (a repository may hold the same weights twice, e.g.
    consolidated.safetensors beside the shards). None when they cannot be had this way (not a hub id, no
    safetensors, unreachable): transformers' own loading then says why."""
    if Path(ref).exists() or not _HUB_ID.match(ref):
        return None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        get = partial(hf_hub_download, ref, revision=revision)
        config = Path(get("config.json"))
        try:
            index = json.loads(Path(get("model.safetensors.index.json")).read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (EntryNotFoundError, LocalEntryNotFoundError):  # one file, or (offline) no index in the cache
            files = ["model.safetensors"]
        for name in files:
            get(name)
        for optional in ("generation_config.json",):
            try:
                get(optional)
            except (EntryNotFoundError, LocalEntryNotFoundError):
                pass
    except Exception:  # offline without a cached copy, gated, no safetensors: transformers' path reports it
        return None
    return config.parent


def _from_local(folder: Path, kwargs: dict, name: str | None = None):
    """A local folder's model with its tensors read one at a time (tensors.deferred_state_dict), not memory-mapped:
    the peak of loading is then the model as loaded plus one stored tensor, not plus the whole checkpoint (which a
    dtype change or 4-bit quantization otherwise keeps mapped until the end). The weights are the same."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from llamatune.artifacts.tensors import Safetensors, deferred_state_dict

    config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs["trust_remote_code"])
    if type(config) not in AutoModelForCausalLM._model_mapping:  # remote code: transformers' own loading
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    rest = {k: v for k, v in kwargs.items() if k not in ("revision", "trust_remote_code")}
    model = model_class.from_pretrained(None, config=config, state_dict=deferred_state_dict(Safetensors.folder(folder)),
                                        **rest)
    model.name_or_path = model.config._name_or_path = name or str(folder)  # what peft records as the adapter's base
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _disable_cpu_inference_packing(model) -> None:
    """Keeps 4-bit layers on their differentiable path on CPU.

    On CPUs with AVX512-BF16, a bitsandbytes Linear4bit run in eval mode without grad (our held-out
    evaluation) repacks its weight into an inference-only layout, permanently; later training
    forwards then go through a kernel with no autograd, so gradients stop flowing back through the
    frozen base layers and the adapter trains on silently wrong gradients (bitsandbytes 0.50).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def resolve_dtype(requested: str, precision: str) -> str:
    """A recipe dtype (model.dtype, quantization.compute_dtype) as a torch dtype name: itself, or for auto the
    dtype the resolved precision computes in (bf16 -> bfloat16, fp16 -> float16, else float32)."""
    if requested != "auto":
        return requested
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def _bnb_config(quant: QuantizationSpec, sharded: bool = False, precision: str = "fp32"):
    import torch
    from transformers import BitsAndBytesConfig

    if quant.mode == "nf4":
        compute = getattr(torch, resolve_dtype(quant.compute_dtype, precision))
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute if sharded else torch.uint8,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def linear_module_names(model: "torch.nn.Module") -> list[str]:
    """Leaf names of the linear layers LoRA can target (the output head excluded, as peft does)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def meta_linear_module_names(ref: str, spec: ModelSpec) -> list[str]:
    """linear_module_names of the model `ref` built from its config.json on the meta device: no weight
    is read or allocated, so even an 8B model answers in about a second.

    Raises:
        LlamatuneError: If the config cannot be read or names an architecture transformers does not know.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ref, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        where = Path(ref) / "config.json" if Path(ref).is_dir() else ref
        raise LlamatuneError(f"could not build the model described by {where}: {exc}") from None
    return linear_module_names(model)


def target_module_problems(lora: LoraSpec, available: list[str]) -> list[str]:
    """One problem per lora.target_modules entry that is not a linear layer of the model, with a did-you-mean."""
    if lora.target_modules == "all-linear":
        return []
    problems = []
    for i, m in enumerate(lora.target_modules):
        if m not in available:
            close = difflib.get_close_matches(m, available, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"lora.target_modules.{i}: {m!r} not in model; linear layers: {', '.join(available)}.{hint}")
    return problems


def apply_lora(model, lora: LoraSpec, quantized: bool, gradient_checkpointing: bool = False, extra: dict | None = None):
    """Freezes the base and wraps it in a peft LoRA adapter.

    Args:
        extra: More LoraConfig arguments (modules_to_save, exclude_modules): see extra_trainable.

    Raises:
        RecipeError: If lora.target_modules names a module the model does not have.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    problems = target_module_problems(lora, linear_module_names(model))
    if problems:
        raise RecipeError(problems)
    for param in model.parameters():
        param.requires_grad = False
    if quantized:
        # The norms in float32, as peft's prepare_model_for_kbit_training does; unlike it, the frozen embeddings and
        # output head stay in model.dtype: its float32 copies of them took a Llama-3-8B shape loaded in nf4 from
        # 6.6 to 10.6 GiB resident, for lookups and a matmul that autocast runs in the training precision anyway.
        for param in model.parameters():
            if param.ndim == 1 and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # the frozen embeddings must still pass gradients through
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if lora.target_modules == "all-linear" else list(lora.target_modules),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
        **(extra or {}),
    )
    return get_peft_model(model, config)


def extra_trainable(train_extra: str, ref: str) -> dict:
    """LoraConfig arguments for distill.train_extra: norms trains every RMSNorm weight in full (peft's
    modules_to_save matches module names by suffix: input_layernorm, post_attention_layernorm, model.norm);
    neighbours trains in full the decoder layers next to the blocks `llamatune prune` removed (its
    prune_report.json names them), with no LoRA inside them.

    Raises:
        RecipeError: neighbours for a student that `llamatune prune` did not write.
    """
    if train_extra == "none":
        return {}
    if train_extra == "norms":
        return {"modules_to_save": ["norm", "layernorm"]}
    report = Path(ref) / "prune_report.json"
    if not report.is_file():
        raise RecipeError([f"distill.train_extra: neighbours trains the layers next to the blocks a pruning removed, "
                           f"and {ref} has no prune_report.json naming them (write the student with `llamatune prune`, "
                           "or use train_extra: norms)"])
    layers = json.loads(report.read_text())["neighbours"]
    if not layers:
        return {}
    total = json.loads((Path(ref) / "config.json").read_text())["num_hidden_layers"]
    if len(layers) >= total:
        raise RecipeError([f"distill.train_extra: neighbours would train all {total} layers of {ref} in full (each is "
                           "next to a removed block), leaving nothing for LoRA; use train_extra: norms"])
    names = "|".join(str(i) for i in layers)
    return {"modules_to_save": [f"layers.{i}" for i in layers], "exclude_modules": rf".*\.layers\.({names})\..*"}


def make_optimizer(params, name: str, lr: float, weight_decay: float):
    """AdamW from torch or bitsandbytes (8-bit state; paged variant), by the recipe's closed choice."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def count_parameters(peft_model) -> tuple[int, int]:
    """Returns (trainable, total) parameter counts; peft counts 4-bit weights at their logical size."""
    return peft_model.get_nb_trainable_parameters()
