"""The teacher pass of train.method: distill: the teacher's top-k log-probs at every trained position of the
training and held-out rows, computed once, before the student is loaded, and cached.

The cache is content-addressed like the data cache: its key hashes the rows' tokens and labels, the teacher's
weights (adapter and base files, sha256), top_k, the temperature, the precision and llamatune's cache format, so
a second run with other student settings (another student, kd_ratio, loss, LoRA rank, learning rate) reads it back
and the teacher is never loaded again. It is written in shards of 64 rows (safetensors, no pickle), each renamed
into place when complete: a teacher pass that was killed resumes at its first missing shard. Several processes
(DDP) each compute a share of the shards. The teacher is freed before the student loads: the two are never in
memory together.

Layout: <cache>/teacher/<key>/{train,eval}-<first row>.safetensors with `top` (int32 [positions, k]), `logp`
(float32 [positions, k + 1]: the grouped log-probs of train/distill.py) and `counts` (positions per row), then
complete.json.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
import hashlib
import json
from array import array
from pathlib import Path
from typing import Callable

from llamatune import __version__, strictjson
from llamatune.catalog import cache_dir
from llamatune.errors import LlamatuneError
from llamatune.fingerprint import sha256_file

_FORMAT = 1
ROWS_PER_SHARD = 64


def teacher_files(teacher: str) -> list[Path]:
    """The files whose bytes define the teacher: a run's adapter and its base's weights and configs, a folder's
    weights and configs, a GGUF; [] for a name (builtin alias or hub id: its name and revision define it)."""
    path = Path(teacher)
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    if (path / "adapter").is_dir():  # a run directory: its adapter, on its base
        from llamatune import model as models
        from llamatune.recipe import load_recipe

        recipe = load_recipe(path / "recipe.yaml", saved=True)
        base = models.resolve(recipe.model, lambda *_: None)
        return sorted((path / "adapter").glob("*")) + teacher_files(base)
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".gguf") and p.is_file())


def cache_key(recipe, data, precision: str) -> str:
    """Hex key of a teacher pass: what it computes from (see the module's docstring)."""
    spec = recipe.distill
    rows = hashlib.sha256()
    for split in (data.train, data.eval):
        for row in split:
            for e in row:
                rows.update(array("q", e.input_ids).tobytes() + b"|" + array("q", e.labels).tobytes() + b";")
            rows.update(b"\n")
        rows.update(b"#")
    files = [(p.name, sha256_file(p)) for p in teacher_files(spec.teacher)]
    payload = {"format": _FORMAT, "llamatune": __version__, "teacher": spec.teacher if not files else None,
               "teacher_files": files, "top_k": spec.top_k, "temperature": spec.temperature, "precision": precision,
               "rows": rows.hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_teacher(teacher: str, precision: str, say: Callable[[str], None]):
    """(model, tokenizer) of distill.teacher, for inference in `precision`'s dtype."""
    from llamatune import model as models
    from llamatune.schema import ModelSpec, QuantizationSpec

    path = Path(teacher)
    if path.exists():
        from llamatune.evaluate.target import load_target

        target = load_target(path, say, precision=precision)
        return target.model.eval(), target.tokenizer
    spec = ModelSpec(path=teacher)
    ref = models.resolve(spec, say)
    model = models.load_base(ref, spec, QuantizationSpec(), precision=precision).eval()
    return model, models.load_tokenizer(ref)


def teacher_tokenizer(teacher: str, say: Callable[[str], None] = print):
    """The teacher's tokenizer alone (for the vocabulary check before any weight is read)."""
    from llamatune import model as models
    from llamatune.schema import ModelSpec

    path = Path(teacher)
    if path.is_dir() and (path / "tokenizer").is_dir():
        from llamatune.evaluate.target import run_tokenizer

        return run_tokenizer(path)
    return models.load_tokenizer(models.resolve(ModelSpec(path=teacher), say))


def vocabulary_problems(student, teacher) -> list[str]:
    """Why the teacher's distributions cannot be compared with the student's token by token: a smaller vocabulary,
    or the same id naming another token (the first few are named)."""
    mine, theirs = student.convert_ids_to_tokens(range(len(student))), teacher.convert_ids_to_tokens(range(len(teacher)))
    if len(theirs) < len(mine):
        return [f"distill.teacher: its tokenizer has {len(theirs):,} tokens, the student's {len(mine):,}; distillation "
                "compares the two next-token distributions token by token, so the teacher must cover the student's "
                "vocabulary (use a teacher of the same model family)"]
    differ = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
    if not differ:
        return []
    shown = ", ".join(f"id {i}: {mine[i]!r} (student) vs {theirs[i]!r} (teacher)" for i in differ[:3])
    return [f"distill.teacher: {len(differ):,} token ids name different tokens in the teacher's and the student's "
            f"tokenizers ({shown}); distillation compares distributions token by token, so both must use one "
            "vocabulary (a teacher of the same model family)"]


def targets(recipe, data, collate, pad_id: int, vocab: int, acc, autocast, precision: str, batch_size: int,
            console) -> dict:
    """The teacher's cached targets of every row, {"train": [(top, logp) per row], "eval": [...]}: read from the
    cache, or computed there first (the teacher loaded, run over the missing shards, and freed)."""
    from llamatune import lock

    say = console.print if acc.is_main_process else (lambda *_: None)
    folder = cache_dir() / "teacher" / cache_key(recipe, data, precision)[:32]
    done = folder / "complete.json"
    if not done.is_file():
        import torch

        # Loading the teacher draws random numbers (peft initializes the LoRA layers it then overwrites): a run that
        # computes the pass and one that reads it from the cache must give the student the same initialization.
        cuda = list(range(torch.cuda.device_count()))
        with lock.hold(folder, "computing the teacher's targets", wait=True, say=say) if acc.is_main_process else nullcontext(), \
                torch.random.fork_rng(devices=cuda):
            if not done.is_file():
                _compute(recipe, data, collate, pad_id, vocab, acc, autocast, precision, batch_size, console, folder)
        acc.wait_for_everyone()
    else:
        say(f"teacher targets: read from the cache {folder} (computed by an earlier run with the same teacher and data)")
    return {split: _read(folder, split, len(rows)) for split, rows in (("train", data.train), ("eval", data.eval))}


def _shards(rows: list) -> list[int]:
    return list(range(0, len(rows), ROWS_PER_SHARD))


def _compute(recipe, data, collate, pad_id, vocab, acc, autocast, precision, batch_size, console, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from llamatune.progress import Phase

    spec = recipe.distill
    folder.mkdir(parents=True, exist_ok=True)
    work = [(split, rows, first) for split, rows in (("train", data.train), ("eval", data.eval)) for first in _shards(rows)]
    mine = [w for n, w in enumerate(work) if n % acc.num_processes == acc.process_index]
    missing = [w for w in mine if not (folder / f"{w[0]}-{w[2]:07d}.safetensors").is_file()]
    say = console.print if acc.is_main_process else (lambda *_: None)
    if len(missing) < len(mine):
        say(f"teacher targets: resuming, {len(mine) - len(missing)} of {len(mine)} shards already in {folder}")
    if missing:
        with Phase(console, f"teacher: loading {spec.teacher}", enabled=acc.is_main_process):
            model, _ = load_teacher(spec.teacher, precision, say)
            model.to(acc.device)
        total = sum(min(ROWS_PER_SHARD, len(rows) - first) for _, rows, first in missing) * acc.num_processes
        with Phase(console, f"teacher: top-{spec.top_k} log-probs of every trained position (once; cached)", total,
                   "rows", acc.is_main_process) as phase, torch.no_grad():
            for split, rows, first in missing:
                part = rows[first:first + ROWS_PER_SHARD]
                tops, logps, counts = [], [], []
                for start in range(0, len(part), batch_size):
                    batch = {k: v.to(acc.device) for k, v in collate(part[start:start + batch_size], pad_id).items()}
                    with autocast():
                        top, logp, per_row = _top_k(model, batch, spec.top_k, spec.temperature, vocab)
                    tops.append(top.to(torch.int32).cpu())
                    logps.append(logp.float().cpu())
                    counts.append(per_row.cpu())
                    phase.advance(min(batch_size, len(part) - start) * acc.num_processes)
                path = folder / f"{split}-{first:07d}.safetensors"
                staging = path.with_name(f".{path.name}.partial")
                save_file({"top": torch.cat(tops).contiguous(), "logp": torch.cat(logps).contiguous(),
                           "counts": torch.cat(counts).to(torch.int64)}, str(staging))
                staging.replace(path)  # a shard is either whole or absent: a killed pass resumes at the next one
        del model
        gc.collect()
    acc.wait_for_everyone()
    if acc.is_main_process:
        strictjson.write(folder / "complete.json", {"teacher": spec.teacher, "top_k": spec.top_k,
                                                    "temperature": spec.temperature, "precision": precision,
                                                    "rows": {"train": len(data.train), "eval": len(data.eval)}})


def _top_k(model, batch: dict, k: int, temperature: float, vocab: int):
    """(top tokens [N, k], grouped log-probs [N, k(+1)], trained positions per row [B]) of one batch, over the first
    `vocab` tokens (the shared vocabulary: rows a teacher's embedding matrix is padded with past it are no tokens)."""
    import torch

    from llamatune.train.distill import grouped_log_probs
    from llamatune.train.loss import CHUNK_ELEMENTS, scored_outputs, trained_positions

    rows, cols, _ = trained_positions(batch["labels"])
    outputs, head = scored_outputs(model, batch, rows, cols)
    width = head.shape[0] if head is not None else outputs.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // width)
    tops, logps = [], []
    for start in range(0, outputs.shape[0], chunk):
        part = outputs[start:start + chunk]
        logits = (part @ head.t() if head is not None else part).float()
        logits = logits[:, :vocab] / temperature
        top = logits.topk(min(k, logits.shape[1]), dim=-1).indices  # sorted: column 0 is the teacher's top-1
        tops.append(top)
        logps.append(grouped_log_probs(logits, top))
    per_row = torch.bincount(rows, minlength=batch["labels"].shape[0])
    if not tops:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k + 1), per_row
    return torch.cat(tops), torch.cat(logps), per_row


def _read(folder: Path, split: str, n_rows: int) -> list:
    """Per row: (top [n, k], logp [n, k(+1)]), from the shards of `split`."""
    from safetensors.torch import load_file

    out: list = []
    for first in range(0, n_rows, ROWS_PER_SHARD):
        path = folder / f"{split}-{first:07d}.safetensors"
        if not path.is_file():
            raise LlamatuneError(f"the teacher cache {folder} has no {path.name} though it is marked complete; delete "
                                 "the folder and train again (the teacher pass is then computed afresh)")
        shard = load_file(str(path))
        counts = shard["counts"].tolist()
        out += list(zip(shard["top"].split(counts), shard["logp"].split(counts)))
    if len(out) != n_rows:
        raise LlamatuneError(f"the teacher cache {folder} holds {len(out)} {split} rows, the data has {n_rows}; delete "
                             "the folder and train again")
    return out
