"""`llamatune bench RECIPE --steps N`: time N real training steps of a recipe on this machine and project
the full run; put the measured peak memory next to `llamatune plan`'s estimate.

The steps run through the same train() as `llamatune train` (same batches, precision, loss), into a
temporary run directory, without the held-out evaluations; one held-out batch is timed separately to
project the held-out passes of the full run (before, every eval_every steps, after).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llamatune.progress import Phase


def run_bench(recipe_path: Path, overrides: list[str], steps: int, console: Console, profile: bool = False) -> dict:
    """Runs the benchmark and prints its report.

    Args:
        profile: Also run the steps under torch.profiler and print the operations that took the most CPU
            (or CUDA) time: where a step's time goes on this machine. The profiler slows the steps a little.

    Returns:
        The numbers printed: tokens_per_s, step_s, peak_rss_gib, plan_gib, projected_s and their parts
        (and `profile`, the top operations, when asked).
    """
    import torch

    from llamatune.train import plan as planning
    from llamatune.recipe import load_recipe
    from llamatune.memory import active_allocator, peak_rss_gib
    from llamatune.train.loop import train
    from llamatune.train.objective import held_out_mean

    runtime = planning.runtime_resident_bytes()  # before the model loads: what plan calls "runtime"
    recipe = load_recipe(recipe_path, overrides)
    short = load_recipe(recipe_path, [*overrides, "train.epochs=null", f"train.max_steps={steps}", "train.log_every=1", "train.save_every=null",
                                      "train.tensorboard=false", "train.tracking=none"])
    with tempfile.TemporaryDirectory(prefix="llamatune-bench-") as tmp:
        console.print(f"bench: {steps} training steps in a temporary run directory {tmp} (deleted afterwards), "
                      "no held-out passes", highlight=False)
        t0 = time.perf_counter()
        with (torch.profiler.profile() if profile else nullcontext()) as profiler:
            result = train(short, "bench", run_dir=Path(tmp) / "run", console=console, evaluate_held_out=False)
        wall = time.perf_counter() - t0
        lines = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        with Phase(console, "bench: timing held-out batches (for the projection)"):
            eval_s, reference_s = _time_held_out(recipe, result, held_out_mean, torch)  # reads the run's tokenizer
    steps_logged = [m for m in lines if "tokens_per_s" in m]
    elapsed = [m["elapsed_s"] for m in steps_logged]
    durations = [b - a for a, b in zip([0.0] + elapsed, elapsed)]
    steady = durations[1:] or durations  # the first step pays one-time costs (allocator, kernels)
    step_s = statistics.median(steady)
    tokens_per_step = [m["tokens"] - p for m, p in zip(steps_logged, [0] + [m["tokens"] for m in steps_logged])]
    tokens_per_s = sum(tokens_per_step[1:] or tokens_per_step) / sum(steady)
    totals = result.summary["data"]

    # ---- the full recipe: its steps, tokens and two held-out passes ----
    cfg = recipe.train
    micro_per_epoch = math.ceil(totals["train_rows"] / cfg.micro_batch_size)
    full_steps = cfg.planned_steps(math.ceil(micro_per_epoch / cfg.grad_accum))
    mean_step_tokens = totals["train_tokens"] / math.ceil(micro_per_epoch / cfg.grad_accum)
    train_s = full_steps * mean_step_tokens / tokens_per_s
    # before (unless eval_before: false), every eval_every steps short of the last, and after the last
    evals = int(cfg.eval_before) + 1 + ((full_steps - 1) // cfg.eval_every if cfg.eval_every else 0)
    projected = train_s + evals * eval_s + reference_s
    peak = peak_rss_gib() if not torch.cuda.is_available() else torch.cuda.max_memory_allocated() / 2**30
    estimate = _plan_gib(recipe, totals, runtime)
    report = {"steps": steps, "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 3),
              "peak_memory_gib": round(peak, 2), "memory": "GPU allocated" if torch.cuda.is_available() else "process RSS",
              "allocator": active_allocator(),
              "plan_estimate_gib": round(estimate, 2) if estimate else None, "full_steps": full_steps,
              "projected_train_s": round(train_s), "projected_eval_s": round(evals * eval_s),
              "projected_reference_s": round(reference_s), "projected_total_s": round(projected),
              "bench_wall_s": round(wall, 1), "precision": result.summary["precision"], "device": result.summary["device"]}
    if profile:
        report["profile"] = _top_operations(profiler, torch.cuda.is_available())
    _show(report, console)
    return report


def _top_operations(profiler, cuda: bool, count: int = 12) -> list[dict]:
    """The operations with the most self time, each with its share of all operations' self time."""
    self_us = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total  # noqa: E731
    events = sorted((e for e in profiler.key_averages() if not e.key.startswith("ProfilerStep")), key=lambda e: -self_us(e))
    total = sum(self_us(e) for e in events) or 1
    return [{"op": e.key, "calls": e.count, "self_s": round(self_us(e) / 1e6, 3), "share": round(self_us(e) / total, 3)}
            for e in events[:count]]


def _time_held_out(recipe, result, held_out_loss, torch) -> tuple[float, float]:
    """Seconds for one held-out pass and for the reference log-probs pass (DPO: one forward of every train and
    held-out pair before step 1; 0 otherwise), from timing up to 16 held-out examples and scaling by tokens."""
    from accelerate import Accelerator

    from llamatune.data.batches import collate as collate_rows
    from llamatune.data.batches import eval_order
    from llamatune.data.pipeline import build_datasets
    from llamatune.model import training_precision
    from llamatune.train.objective import objective_for

    model = result.model
    tokenizer = _tokenizer_of(result)
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    if not data.eval:
        return 0.0, 0.0
    sample = data.eval[:16]
    objective = objective_for(recipe)
    needs_reference = getattr(objective, "needs_reference", False)
    if needs_reference:  # timing only: the values do not change the work of a forward pass
        objective.reference = {"eval": [torch.zeros(len(row), 2) for row in sample]}
    if recipe.train.method == "distill":  # likewise; the real teacher targets are cached by the bench's own run
        from llamatune.data.encode import IGNORE_INDEX

        positions = [int((collate_rows([row], tokenizer.pad_token_id)["labels"][:, 1:] != IGNORE_INDEX).sum()) for row in sample]
        k = recipe.distill.top_k
        objective.reference = {"eval": [(torch.zeros(n, k, dtype=torch.long), torch.full((n, k + 1), -1.0)) for n in positions]}
    precision = training_precision(recipe.train.precision)
    autocast = (lambda: torch.autocast(model.device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    t0 = time.perf_counter()
    held_out_loss(model, objective, sample, eval_order(sample, recipe.train.micro_batch_size), tokenizer.pad_token_id,
                  Accelerator(), autocast, lambda: None)
    seconds = time.perf_counter() - t0
    count = lambda rows: sum(len(e.input_ids) for row in rows for e in row)  # noqa: E731
    per_token = seconds / max(count(sample), 1)
    return per_token * count(data.eval), per_token * (count(data.train) + count(data.eval)) if needs_reference else 0.0


def _tokenizer_of(result):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(result.summary["run_dir"]) / "tokenizer")


def _plan_gib(recipe, totals, runtime: int) -> float | None:
    import torch
    from transformers import AutoConfig

    from llamatune.train import plan as planning
    from llamatune.model import resolve

    if torch.cuda.is_available():
        return None  # the GPU plan needs the device's name; `llamatune plan --device` gives it
    config = AutoConfig.from_pretrained(resolve(recipe.model, lambda *_: None))
    return planning.estimate(recipe, config, planning.this_machine(), totals["longest_row"], runtime).total / 2**30


def _show(r: dict, console: Console) -> None:
    minutes = lambda s: f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"  # noqa: E731
    console.print(f"[bold]bench[/] {r['steps']} steps on {r['device']} ({r['precision']}): "
                  f"{r['tokens_per_s']:,.0f} tokens/s, {r['step_s']:.2f} s/step (median after the first)")
    plan = f" | plan estimated {r['plan_estimate_gib']:.2f} GiB" if r["plan_estimate_gib"] else ""
    console.print(f"peak memory {r['peak_memory_gib']:.2f} GiB ({r['memory']}, {r['allocator']} malloc){plan}")
    console.print(f"full recipe: {r['full_steps']} steps ≈ {minutes(r['projected_train_s'])} training + "
                  f"{minutes(r['projected_eval_s'])} held-out evaluation"
                  + (f" + {minutes(r['projected_reference_s'])} reference log-probs" if r["projected_reference_s"] else "")
                  + f" ≈ [bold]{minutes(r['projected_total_s'])}[/]"
                  f" (bench took {r['bench_wall_s']:.0f} s)")
    if "profile" in r:
        table = Table("operation", "calls", "self time", "share", title="where the time went (profiled, all steps)")
        for op in r["profile"]:
            table.add_row(op["op"], str(op["calls"]), f"{op['self_s']:.2f} s", f"{op['share']:.0%}")
        console.print(table)
