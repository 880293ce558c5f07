"""What `eval`, `chat`, merge and export score: a run directory (base + its adapter, the training tokenizer), a
checkpoint of one, a merged folder or a .gguf, loaded as a `Target`; and the adapter a run started from, beside its
own (`--compare start`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from llamatune import model as models
from llamatune.errors import LlamatuneError, RecipeError


@dataclass
class Target:
    """What is evaluated: a model (with a switchable adapter for a run), its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    has_adapter: bool
    name: str
    recipe: Any = None  # the run's resolved recipe, when the target is a run directory


def load_target(path: Path, say: Callable[[str], None] = print, precision: str = "fp32") -> Target:
    """Loads a run directory (base + adapter, the training tokenizer), a merged model folder, or a .gguf file.

    Args:
        precision: The precision it will run in: with model.dtype auto, bf16 stores the weights in bfloat16.

    Raises:
        RecipeError: If the path is none of these.
        LlamatuneError: If one of its files is missing or damaged (the message names it).
    """
    from llamatune.artifacts.files import target_kind
    from llamatune.schema import ModelSpec, QuantizationSpec

    kind = target_kind(path)
    if kind == "run":
        from llamatune.recipe import load_recipe

        recipe = load_recipe(path / "recipe.yaml", saved=True)
        tokenizer = run_tokenizer(path)  # before the weights: the cheap file first
        base = models.load_base(models.resolve(recipe.model, say), recipe.model, recipe.quantization, precision=precision)
        return Target(with_adapter(base, path).eval(), _padded(tokenizer), True, str(path), recipe)
    if kind == "checkpoint":
        return _checkpoint_target(path, say)
    spec = ModelSpec(path=str(path))
    ref = models.resolve(spec, say)
    model = models.load_base(ref, spec, QuantizationSpec(), precision=precision).eval()
    return Target(model, models.load_tokenizer(ref), False, str(path))


def _checkpoint_target(path: Path, say: Callable[[str], None]) -> Target:
    """A checkpoint (RUN/checkpoints/step-N) as a target: the run's base with a fresh LoRA adapter of the run's
    settings, its weights replaced by the checkpoint's. A stopped run has no tokenizer/ yet: the base model's
    tokenizer is what training used then (the pipeline applies the recipe's chat template to it again)."""
    import torch
    from safetensors.torch import load_file

    from llamatune.recipe import load_recipe
    from llamatune.train import checkpoint

    run = path.parent.parent
    recipe = load_recipe(run / "recipe.yaml", saved=True)
    checkpoint.verify(path)  # a damaged checkpoint is named, not half-loaded
    ref = models.resolve(recipe.model, say)
    tokenizer = run_tokenizer(run) if (run / "tokenizer").is_dir() else \
        models.load_tokenizer(ref, recipe.model.revision, recipe.model.trust_remote_code)
    quantized = recipe.quantization.mode != "none"
    extra = models.extra_trainable(recipe.distill.train_extra, ref) if recipe.train.method == "distill" else None
    model = models.apply_lora(models.load_base(ref, recipe.model, recipe.quantization), recipe.lora, quantized, extra=extra)
    params = dict(model.named_parameters())
    tensors = {name.removeprefix("module."): t for name, t in load_file(path / "adapter.safetensors").items()}
    missing = sorted(set(tensors) - set(params)) or sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    if missing:
        raise LlamatuneError(f"checkpoint {path} does not fit the LoRA settings in {run / 'recipe.yaml'} (e.g. {missing[0]}); "
                             "was that recipe edited after training?")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return Target(model.eval(), _padded(tokenizer), True, str(path), recipe)


def run_tokenizer(run: Path):
    """The tokenizer a run was trained with (RUN/tokenizer, its chat template included)."""
    from transformers import AutoTokenizer

    from llamatune.artifacts.files import FIX_RUN, opened

    return opened(partial(AutoTokenizer.from_pretrained, str(run / "tokenizer")), run / "tokenizer", "tokenizer", FIX_RUN)


def with_adapter(base, run: Path):
    """`base` wrapped in the run's LoRA adapter (RUN/adapter, PEFT format)."""
    from peft import PeftModel

    from llamatune.artifacts.files import FIX_RUN, opened

    try:
        return opened(partial(PeftModel.from_pretrained, base, str(run / "adapter")), run / "adapter", "adapter", FIX_RUN)
    except (RuntimeError, ValueError, KeyError) as exc:  # whole files that do not fit: shapes or module names differ
        from llamatune.artifacts.lora import does_not_fit

        raise does_not_fit(run, base.name_or_path, str(exc).strip().splitlines()[0][:300]) from None


def _padded(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_start(target: Target, path: Path) -> None:
    """Loads the adapter the run started from (its recipe's model.adapter) beside its own, as "start".

    Raises:
        RecipeError: If the run did not start from an adapter.
    """
    start = target.recipe.model.adapter if target.recipe is not None else None
    if start is None:
        raise RecipeError([f"--compare start needs a run that started from another run's adapter (model.adapter); "
                           f"{path} did not: use --compare base"])
    from llamatune.artifacts.files import FIX_RUN, opened

    folder = Path(start) / "adapter"
    opened(partial(target.model.load_adapter, str(folder), adapter_name="start"), folder, "adapter", FIX_RUN)
    target.model.eval()


def load_other_run(target: Target, path: Path, other: Path, name: str) -> None:
    """Loads another run's adapter beside this run's own, as `name`, to score both on the same base (e.g. the same
    student trained by distillation and by SFT alone).

    Raises:
        RecipeError: If `other` is not a finished run, or was trained on another base model.
    """
    from llamatune.artifacts.files import FIX_RUN, opened, run_dir_problem
    from llamatune.recipe import load_recipe

    problem = run_dir_problem(other) if other.is_dir() else f"{other} is not a folder"
    if problem:
        raise RecipeError([f"--compare {other}: {problem}; give base, start, teacher or a finished run directory"])
    theirs = load_recipe(other / "recipe.yaml", saved=True)
    if target.recipe is None or theirs.model.path != target.recipe.model.path:
        mine = target.recipe.model.path if target.recipe is not None else path
        raise RecipeError([f"--compare {other}: it was trained on {theirs.model.path}, {path} on {mine}; two runs are "
                           "compared on one base model (their adapters are switched on the same loaded model)"])
    folder = other / "adapter"
    opened(partial(target.model.load_adapter, str(folder), adapter_name=name), folder, "adapter", FIX_RUN)
    target.model.eval()
