"""The recipe: a YAML file validated into frozen pydantic models.

Every key is declared here with its type, default and meaning (the descriptions are the reference
documentation: `llamatune schema` prints them). Unknown keys are errors, never silently
ignored, and all problems are reported at once with the dotted key, the YAML line and a suggestion.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llamatune.errors import RecipeError

Dtype = Literal["float32", "bfloat16", "float16"]


class _Spec(BaseModel):
    # Frozen so a recipe cannot drift after validation; extra="forbid" so typos are errors.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelSpec(_Spec):
    """Which base model to fine-tune."""

    path: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a builtin alias (`llamatune models list`), a local Hugging Face "
        "folder, a local .gguf file, or a hub id such as 'org/name' (needs a network once).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); hub ids only.")
    dtype: Dtype = Field(
        "float32",
        description="Dtype of the frozen base weights. float32 is exact and the fastest on most CPUs; "
        "bfloat16 halves memory on GPUs that support it.",
    )


class LoraSpec(_Spec):
    """The LoRA adapter (peft)."""

    r: int = Field(16, ge=1, le=1024, description="Adapter rank. Higher = more capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    target_modules: Union[Literal["all-linear"], tuple[str, ...]] = Field(
        "all-linear",
        description="'all-linear' (every linear layer except the output head) or a list of module "
        "names such as [q_proj, k_proj, v_proj, o_proj].",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r); helps at high rank.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): often better quality, ~2x slower.")

    @model_validator(mode="after")
    def _non_empty_targets(self) -> "LoraSpec":
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise ValueError("target_modules is an empty list; use 'all-linear' or name at least one module")
        return self


class QuantizationSpec(_Spec):
    """Quantize the frozen base (QLoRA). The adapter itself always trains in full precision."""

    mode: Literal["none", "nf4", "int8"] = Field(
        "none", description="none | nf4 (4-bit NormalFloat, QLoRA) | int8 (LLM.int8). Needs bitsandbytes."
    )
    double_quant: bool = Field(True, description="nf4 only: also quantize the quantization constants (~0.4 bit/param saved).")
    compute_dtype: Dtype = Field("float32", description="nf4 only: dtype the 4-bit weights are dequantized to for matmuls.")


class DataSpec(_Spec):
    """Instruction data: JSON Lines, one object per line with a prompt field and a response field."""

    train: Path = Field(description="Training file (.jsonl). Relative paths are relative to the recipe file.")
    eval: Path | None = Field(None, description="Held-out file (.jsonl). If omitted, eval_fraction of train is held out.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Share of train held out when `eval` is not given (then defaults to 0.1)."
    )
    prompt_field: str = Field("prompt", description="Key of the user prompt in each record.")
    response_field: str = Field("response", description="Key of the target answer in each record.")
    system_prompt: str | None = Field(None, description="Optional system message put before every prompt.")
    max_length: int = Field(512, ge=16, description="Max tokens per example; longer examples are dropped and counted.")

    @model_validator(mode="before")
    @classmethod
    def _default_fraction(cls, raw: Any) -> Any:
        # The 0.1 default applies only without a held-out file, so the resolved recipe never
        # carries both (and reloads cleanly).
        if isinstance(raw, dict) and raw.get("eval") is None and raw.get("eval_fraction") is None:
            return {**raw, "eval_fraction": 0.1}
        return raw

    @model_validator(mode="after")
    def _eval_or_fraction(self) -> "DataSpec":
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("set either `eval` (a held-out file) or `eval_fraction` (split train), not both")
        if self.prompt_field == self.response_field:
            raise ValueError(f"prompt_field and response_field are both {self.prompt_field!r}")
        return self


class TrainSpec(_Spec):
    """The optimisation loop."""

    seed: int = Field(42, description="Seeds data order, the held-out split, adapter init and dropout.")
    epochs: int = Field(1, ge=1, description="Passes over the training set (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = micro x accum x processes).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup before the cosine decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null disables clipping.")
    eval_every: int | None = Field(None, ge=1, description="Also evaluate held-out loss every N steps (always before and after).")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast for the forward pass (GPU).")


class OutputSpec(_Spec):
    """Where the run directory goes."""

    dir: Path = Field(Path("runs"), description="Parent folder of run directories. Relative to the current directory.")
    name: str | None = Field(None, description="Run name; default '<recipe name>-<timestamp>'. An existing non-empty run is never overwritten.")


class Recipe(_Spec):
    """A complete fine-tuning recipe."""

    model: ModelSpec = ModelSpec()
    lora: LoraSpec = LoraSpec()
    quantization: QuantizationSpec = QuantizationSpec()
    data: DataSpec
    train: TrainSpec = TrainSpec()
    output: OutputSpec = OutputSpec()


# Keys that hold file paths: resolved against the recipe's folder (or the cwd for --set) and
# expanded for ${ENV_VARS}, so a run directory records absolute, reproducible paths.
_PATH_KEYS = (("data", "train"), ("data", "eval"))


# Names other tools (peft, transformers, axolotl) use for our keys: spelling is not close, intent is.
_KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "sequence_len": "max_length", "max_seq_length": "max_length",
    "model_name_or_path": "path", "base_model": "path", "output_dir": "dir",
}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Reads, resolves and validates a recipe file.

    Args:
        path: YAML recipe file.
        overrides: `key.sub=value` strings; values are parsed as YAML. Relative paths in
            overrides are relative to the current directory.

    Returns:
        The validated, frozen recipe with absolute data paths.

    Raises:
        RecipeError: Listing every problem found (unknown keys, wrong types, bad ranges, bad overrides).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path} (check the path, or see recipes/ for examples)"])
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise RecipeError(["the top level must be a mapping of sections (model:, lora:, data:, ...)"], source=str(path))

    problems: list[str] = []
    _resolve_paths(raw, path.parent, problems)
    for item in overrides:
        key = _apply_override(raw, item, problems)
        if key:
            # A value set on the command line has no line in the file: say where it came from instead.
            lines = {k: v for k, v in lines.items() if k[: len(key)] != key} | {key: "--set"}
    return _validate(raw, lines, str(path), problems)


def parse_recipe(raw: dict[str, Any], base_dir: Path = Path(".")) -> Recipe:
    """Validates an in-memory recipe mapping (paths relative to base_dir)."""
    problems: list[str] = []
    raw = _copy(raw)
    _resolve_paths(raw, base_dir, problems)
    return _validate(raw, {}, None, problems)


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialises a recipe to YAML that load_recipe reads back to an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Lists (dotted key, type, default, description) for every leaf key of the schema."""
    rows = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        if sub is not None:
            rows += describe_keys(sub, f"{prefix}{name}.")
            continue
        ann = field.annotation
        type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "").replace("pathlib.", "")
        default = "required" if field.is_required() else repr(field.default)
        rows.append((f"{prefix}{name}", type_name, default, field.description or ""))
    return rows


def _validate(raw: dict, lines: dict[tuple, int | str], source: str | None, problems: list[str]) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err, lines) for err in exc.errors()]
        recipe = None
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def _describe(err: dict, lines: dict[tuple, int | str]) -> str:
    """Turns one pydantic error into 'dotted.key (line N): what is wrong (did you mean ...)'."""
    loc = tuple(str(p) for p in err["loc"] if not _is_union_tag(p))
    dotted = ".".join(loc) or "(top level)"
    line = _nearest_line(loc, lines)
    where = dotted if line is None else f"{dotted} ({line})" if line == "--set" else f"{dotted} (line {line})"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        alias = _KNOWN_ALIASES.get(loc[-1])
        close = [alias] if alias in allowed else difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
        return f"{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    given = err.get("input")
    shown = f" (got {given!r})" if not isinstance(given, dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}{shown}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the union member it tried into loc, e.g. ('lora', 'target_modules', "literal['all-linear']").
    return isinstance(part, str) and (part.startswith(("literal[", "tuple[")))


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        cls = _model_in(field.annotation) if field else None
        if cls is None:
            return []
    return list(cls.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None


def _key_lines(text: str) -> dict[tuple, int | str]:
    """Maps each dotted key path in the YAML text to its 1-based line number."""
    out: dict[tuple, int | str] = {}

    def walk(node: Any, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = prefix + (str(key.value),)
                out[here] = key.start_mark.line + 1
                walk(value, here)

    walk(yaml.compose(text), ())
    return out


def _nearest_line(loc: tuple, lines: dict[tuple, int | str]) -> int | str | None:
    # A missing key has no line of its own: point at its parent section instead.
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _resolve_paths(raw: dict, base: Path, problems: list[str]) -> None:
    for section, key in _PATH_KEYS:
        sub = raw.get(section)
        if isinstance(sub, dict) and isinstance(sub.get(key), str):
            sub[key] = _resolve_one(f"{section}.{key}", sub[key], base, problems)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        value = model["path"]
        # Only a value that names a local file/folder is rebased; aliases and hub ids stay as written.
        if value.startswith((".", "/", "~", "$")) or value.endswith(".gguf") or (base / value).exists():
            model["path"] = str(_resolve_one("model.path", value, base, problems))


def _resolve_one(key: str, value: str, base: Path, problems: list[str]) -> str:
    missing = [name for name in re.findall(r"\$\{?(\w+)\}?", value) if name not in os.environ]
    if missing:
        problems.append(f"{key}: environment variable ${missing[0]} is not set (in {value!r}); export it or write the path out")
        return value
    expanded = Path(os.path.expanduser(os.path.expandvars(value)))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


def _apply_override(raw: dict, item: str, problems: list[str]) -> tuple[str, ...] | None:
    """Sets one `key.sub=value` in the raw mapping; returns the key path, or None if malformed."""
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        problems.append(f"--set {item!r}: expected key=value, e.g. --set train.lr=1e-4")
        return None
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text  # not YAML: take it as a plain string, validation decides
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            problems.append(f"--set {item!r}: '{part}' is a value, not a section")
            return None
        node = nxt
    if tuple(parts) in _PATH_KEYS or tuple(parts) == ("model", "path"):
        if isinstance(value, str) and (tuple(parts) != ("model", "path") or Path(value).exists() or value.endswith(".gguf")):
            value = _resolve_one(key, value, Path.cwd(), problems)
    node[parts[-1]] = value
    return tuple(parts)


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj
