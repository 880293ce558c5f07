"""`llamatune prune MODEL --keep-layers N --data RECIPE --out DIR`: a smaller student by depth pruning.

Each decoder block's importance is measured on calibration text (the recipe's training examples, tokenized by
the model's own tokenizer): the block influence of ShortGPT (Men et al., 2024), one minus the mean cosine
similarity between the hidden state a block receives and the one it passes on. A block that barely turns its
input changes the least when it is taken out; the blocks with the lowest influence go, the rest are renumbered.
The model runs one decoder layer at a time (artifacts/layerwise.py) and the tensors are copied a block of rows at
a time, so pruning an 8B model needs the memory of one layer, not of the model.

The result is a plain transformers folder (config with the new num_hidden_layers, the tokenizer, generation
config) that any recipe names as model.path, with prune_report.json: the scores, the blocks removed, and the
kept layers next to a removed block (`distill.train_extra: neighbours` trains those in full).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from llamatune import strictjson
from llamatune.errors import RecipeError

LAYER = "model.layers."


def block_influence(config, weights, prompts: list[list[int]], tick: Callable[[], None] = lambda: None) -> list[float]:
    """1 - mean cosine similarity of each decoder layer's input and output hidden states over every prompt token."""
    import torch.nn.functional as F

    from llamatune.artifacts.layerwise import _first, hidden_states

    sums = [0.0] * config.num_hidden_layers
    count = sum(len(p) for p in prompts)

    def hooks(i: int, layer) -> None:
        def measure(module, args, out) -> None:
            sums[i] += float(F.cosine_similarity(args[0].float(), _first(out).float(), dim=-1).sum())
        layer.register_forward_hook(measure)

    hidden_states(config, weights, prompts, hooks, tick)
    return [1.0 - s / count for s in sums]


def plan(scores: list[float], keep: int) -> tuple[list[int], list[int]]:
    """(removed layer indices, kept layers next to a removed block in the new numbering), removing the
    len(scores) - keep layers of lowest influence."""
    removed = sorted(sorted(range(len(scores)), key=lambda i: scores[i])[: len(scores) - keep])
    kept = [i for i in range(len(scores)) if i not in removed]
    new = {old: n for n, old in enumerate(kept)}
    neighbours = sorted({new[j] for i in removed for j in (i - 1, i + 1) if j in new})
    return removed, neighbours


def prune(source: str, keep_layers: int, recipe_path: Path, out: Path, rows: int = 32,
          say: Callable[[str], None] = print) -> dict:
    """Writes `source` with its `keep_layers` most influential decoder layers to `out`; returns the report.

    Raises:
        RecipeError: A keep_layers that keeps every layer or none, a model that is not a Llama-architecture
            safetensors folder, or a recipe without training examples.
    """
    import torch
    from transformers import AutoConfig, GenerationConfig

    from llamatune import model as models
    from llamatune.artifacts.files import check_output
    from llamatune.artifacts.tensors import CHUNK_ELEMENTS, Safetensors, SafetensorsWriter
    from llamatune.artifacts.weights import FolderWeights
    from llamatune.data.pipeline import build_datasets
    from llamatune.progress import Phase
    from llamatune.recipe import load_recipe
    from llamatune.schema import ModelSpec

    check_output(out, "--out")
    ref = models.resolve(ModelSpec(path=source), say)
    config = AutoConfig.from_pretrained(ref)
    total = getattr(config, "num_hidden_layers", 0)
    if config.model_type not in ("llama",) or not (Path(ref) / "config.json").is_file():
        raise RecipeError([f"{source}: pruning reads Llama-architecture models from a local folder; this is "
                           f"{config.model_type!r}"])
    if not 1 <= keep_layers < total:
        raise RecipeError([f"--keep-layers {keep_layers}: {source} has {total} decoder layers; keep between 1 and "
                           f"{total - 1} (about two thirds, {round(total * 2 / 3)}, is a usual start)"])
    recipe = load_recipe(recipe_path)
    tokenizer = models.load_tokenizer(ref)
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed, say=lambda *_: None)
    prompts = [list(e.input_ids) for row in data.train for e in row][:rows]
    if not prompts:
        raise RecipeError([f"--data {recipe_path}: no training examples to measure the layers on"])
    files = Safetensors.folder(Path(ref))
    with Phase(say, f"prune: measuring {total} layers on {len(prompts)} calibration examples", total, "layers") as phase:
        scores = block_influence(config, FolderWeights(Path(ref)), prompts, lambda: phase.advance(1))
    removed, neighbours = plan(scores, keep_layers)
    kept = [i for i in range(total) if i not in removed]
    rename = {f"{LAYER}{old}.": f"{LAYER}{new}." for new, old in enumerate(kept)}

    def new_name(name: str) -> str | None:
        if not name.startswith(LAYER):
            return name
        prefix = LAYER + name[len(LAYER):].split(".", 1)[0] + "."
        return name.replace(prefix, rename[prefix], 1) if prefix in rename else None

    names = [(n, new_name(n)) for n in files.names() if new_name(n) is not None]
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    writer = SafetensorsWriter(staging, [(new, files.dtype(old), files.shape(old)) for old, new in names])
    with Phase(say, f"prune: writing {keep_layers} of {total} layers to {out}", len(names), "tensors") as phase:
        for old, new in names:
            shape = files.shape(old)
            if len(shape) < 2:
                writer.write(new, files.read(old))
            else:
                step = max(1, CHUNK_ELEMENTS // max(1, int(torch.tensor(shape[1:]).prod())))
                writer.write_chunks(new, (files.rows(old, i, min(i + step, shape[0])) for i in range(0, shape[0], step)))
            phase.advance(1)
    writer.close()
    config.num_hidden_layers = keep_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.save_pretrained(staging)
    if (Path(ref) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(ref).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    report = {"source": source, "source_folder": ref, "layers_before": total, "layers_after": keep_layers,
              "score": "block influence: 1 - mean cosine similarity of a layer's input and output hidden states",
              "scores": [round(s, 6) for s in scores], "removed": removed, "kept": kept, "neighbours": neighbours,
              "calibration": {"recipe": str(recipe_path), "examples": len(prompts),
                              "tokens": sum(len(p) for p in prompts)}}
    strictjson.write(staging / "prune_report.json", report)
    staging.rename(out)
    say(f"pruned {source}: removed layers {removed} (lowest influence), kept {keep_layers} of {total}; "
        f"wrote {out.resolve()}")
    return report
