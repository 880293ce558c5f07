"""`llamatune train`: the whole fine-tuning run, top to bottom, in one function on accelerate."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from llamatune import lock, preflight
from llamatune import model as models
from llamatune.artifacts.serving import vllm_lora_check
from llamatune.data.batches import collate, epoch_order, eval_order
from llamatune.data.pipeline import fingerprint
from llamatune.errors import LlamatuneError, RecipeError
from llamatune.memory import active_allocator, peak_rss_gib
from llamatune.progress import Phase
from llamatune.recipe import Recipe, recipe_to_yaml, redactor_of
from llamatune.secrets import scrub
from llamatune.train import checkpoint
from llamatune.train import resume as resume_from
from llamatune.train import tracking
from llamatune.train.plot import write_loss_curve
from llamatune.train.progress import TrainProgress
from llamatune.train.rundir import MetricsLog, start_run_dir, write_manifest, write_summary


# recipe name -> transformers scheduler name (all with linear warmup first)
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class TrainResult:
    """What a finished run leaves in memory: its summary and the trained peft model (unwrapped; None when
    `--resume auto` found the run already finished and trained nothing)."""

    summary: dict
    model: Any


def train(recipe: Recipe, recipe_name: str, run_dir: Path | None = None, console: Console | None = None,
          resume: str | None = None, force_resume: bool = False, save_on_signal: str | None = None,
          evaluate_held_out: bool = True, source: str | None = None) -> TrainResult:
    """Fine-tunes a LoRA adapter as the recipe says and writes a run directory.

    Args:
        recipe: The validated recipe.
        recipe_name: Used in the default run-directory name (usually the recipe file's stem).
        run_dir: Overrides output.dir/output.name.
        console: Where progress goes (default: stdout).
        resume: None (a new run), "auto" (the run's newest complete checkpoint, or a fresh start if it
            has none) or the path of a checkpoint folder.
        force_resume: Resume even if the recipe or the data changed since the checkpoint.
        save_on_signal: Another signal (e.g. "USR1", which Slurm can send before a time limit) that
            checkpoints and stops like SIGTERM.
        evaluate_held_out: False skips every held-out evaluation (`llamatune bench` times steps only).
        source: The recipe file, named in data and recipe errors.

    Returns:
        The summary written to summary.json and the trained model.

    Raises:
        Preempted: After SIGTERM/SIGINT, once a checkpoint is complete (exit code 75).
        lock.Busy: If another process is training in the same run directory (exit code 1).
    """
    console = console or Console(soft_wrap=True)
    # One writer per run directory, locked before torch is imported (seconds): a second run on the same
    # directory is refused at once, naming the holder, and has written nothing. Only the main process
    # locks; the others write their checkpoint RNG files under its lock.
    run_dir = resume_from.run_dir_for(recipe, recipe_name, run_dir, resume)
    main = resume_from.launched_rank() == 0
    with lock.hold(run_dir, "training") if main else nullcontext(), \
            tracking.session(recipe, run_dir, resume, enabled=main and recipe.train.tracking == "mlflow") as tracker:
        return _train(recipe, run_dir, console, resume, force_resume, save_on_signal, evaluate_held_out, source, tracker)


def _train(recipe: Recipe, run_dir: Path, console: Console, resume: str | None, force_resume: bool,
           save_on_signal: str | None, evaluate_held_out: bool, source: str | None, tracker) -> TrainResult:
    """train()'s body, run while the run directory is locked."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from peft.helpers import disable_input_dtype_casting
    from transformers import get_scheduler

    from llamatune.train.dropout import use_fast_dropout  # these three import torch: after the lock, like it
    from llamatune.train.fused import use_lean_blocks, use_lean_lora
    from llamatune.train.objective import held_out_mean, objective_for, reference_logps
    from llamatune.train.start import load_start
    from llamatune.train.teacher import targets as teacher_targets

    cfg = recipe.train
    # Under torchrun/mpirun without a GPU, accelerate only sets up (gloo) distribution when told cpu=True.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    precision = models.training_precision(cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(["train.precision: fp16 autocast needs a CUDA GPU; use bf16 or fp32 on this machine"])
    # bf16 autocast is ours, not accelerate's: accelerate fixes one precision per process, and bf16 needs
    # no loss scaler. fp16 (GPU only) needs accelerate's GradScaler.
    acc = Accelerator(mixed_precision="fp16" if precision == "fp16" else "no", cpu=multi_cpu)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) if precision == "bf16" else acc.autocast
    say = console.print if acc.is_main_process else (lambda *_: None)
    if acc.is_main_process != (resume_from.launched_rank() == 0):
        raise LlamatuneError(f"process {acc.process_index} of {acc.num_processes} was launched without its rank in RANK "
                             "(or PMI_RANK, OMPI_COMM_WORLD_RANK), where llamatune finds which process locks the run "
                             "directory; launch with torchrun or accelerate launch")
    # Decided before the model loads: a used run dir or a bad checkpoint fails in seconds.
    start_at = resume_from.locate(run_dir, resume, say)
    if acc.num_processes > 1:  # every process must use the main process's choice (a timestamped name can differ)
        from accelerate.utils import broadcast_object_list

        start_at = broadcast_object_list([start_at], from_process=0)[0]
    run_dir, ckpt = start_at.run_dir, start_at.checkpoint
    if start_at.finished is not None:
        return TrainResult(summary=start_at.finished, model=None)
    if ckpt is not None:
        resume_from.check_unchanged(run_dir, recipe, force_resume, say)
    set_seed(cfg.seed)  # once: python, numpy, torch (adapter init, dropout) all follow from here

    # ---- every check validate runs, before any weight is read (model source, tokenizer, data, modules) ----
    with acc.main_process_first():  # one process fetches/converts a builtin and fills the data cache; the others reuse them
        checked = preflight.check(recipe, source, say)
    ref, tokenizer, data = checked.ref, checked.tokenizer, checked.data
    data_fingerprint = fingerprint(data.manifest)
    recipe_sha = hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()

    objective = objective_for(recipe)
    if cfg.method == "distill":  # the teacher's targets, before the student loads: the two never share the memory
        objective.reference = teacher_targets(recipe, data, collate, tokenizer.pad_token_id, len(tokenizer), acc,
                                              autocast, precision, cfg.micro_batch_size, console)

    # ---- model ---------------------------------------------------------------------------------
    t_load = time.perf_counter()
    quantized = recipe.quantization.mode != "none"
    sharded = acc.distributed_type.name == "FSDP"  # not testable without GPUs: see README, multi-GPU
    with Phase(console, f"model: loading {ref}" + (f" in {recipe.quantization.mode}" if quantized else ""),
               enabled=acc.is_main_process):
        base = models.load_base(ref, recipe.model, recipe.quantization, device_map={"": str(acc.device)}, sharded=sharded,
                                precision=precision)
    extra = models.extra_trainable(recipe.distill.train_extra, ref) if cfg.method == "distill" else None
    model = models.apply_lora(base, recipe.lora, quantized, cfg.gradient_checkpointing, extra)
    load_start(model, recipe)  # model.adapter: this run continues another run's adapter
    if acc.device.type == "cpu":  # CUDA's fused dropout is cheap; the CPU Bernoulli sampler is not
        use_fast_dropout(model)
    use_lean_blocks(model)  # RMSNorm / SwiGLU that keep fewer tensors for backward
    use_lean_lora(model)  # one autograd node per LoRA layer: no dropped-out input copies, no extra sums
    load_s = time.perf_counter() - t_load
    trainable, total = models.count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = models.make_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)

    # ---- schedule: everything derived from the recipe, printed before the first step --------------
    world, rank = acc.num_processes, acc.process_index
    totals = data.manifest["totals"]
    # Unpacked rows are batched with rows of similar length, so padding stays small (packed ones are full).
    lengths = None if recipe.data.packing else [sum(e.length for e in row) for row in data.train]
    micro_per_epoch = len(epoch_order(len(data.train), cfg.micro_batch_size, cfg.seed, 0, world)) // world
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.planned_steps(steps_per_epoch)
    warmup = round(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(_SCHEDULERS[cfg.scheduler], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    say(
        f"model {ref} ({load_s:.1f}s) | LoRA r={recipe.lora.r} on {recipe.lora.target_modules}: "
        f"{trainable:,} trainable of {total:,} params ({100 * trainable / total:.2f}%)"
        + (f" | base in {recipe.quantization.mode}" if quantized else "")
        + f" | precision {precision}" + (" (auto)" if cfg.precision == "auto" else "")
    )
    say(
        f"data {totals['train_examples']} train / {totals['eval_examples']} held-out examples"
        + (f" packed into {totals['train_rows']} rows ({totals['packing_efficiency']:.0%} full)" if recipe.data.packing else "")
        + f", {totals['train_label_tokens']:,} trained tokens | effective batch "
        f"{cfg.micro_batch_size} x {cfg.grad_accum} accum x {world} proc = {cfg.micro_batch_size * cfg.grad_accum * world} "
        f"| {total_steps} steps ({steps_per_epoch}/epoch), warmup {warmup} | device {acc.device}"
    )

    # ---- a new run directory, or the state of the one being resumed --------------------------------
    start, tokens_seen, skipped, eval_before, best, waited, loss = 0, 0, 0, None, float("inf"), 0, float("nan")
    if ckpt is None:
        if acc.is_main_process:
            start_run_dir(run_dir, recipe)
            write_manifest(run_dir, data.manifest)
            scrub(run_dir, redactor_of(recipe))  # the manifest lists every source path
    else:
        state = resume_from.restored_counters(checkpoint.load(ckpt, acc.unwrap_model(model), optimizer))
        resume_from.check_same_data(state["data_fingerprint"], data_fingerprint, force_resume, say)
        scheduler.load_state_dict(state["scheduler"])
        start, tokens_seen, skipped, eval_before = state["step"], state["tokens"], state["skipped_steps"], state["eval_loss_before"]
        best, waited, loss = state["best_eval_loss"], state["evals_without_improvement"], state["loss"]
        say(f"resuming {run_dir} from {ckpt.name} (step {start} of {total_steps})")
    if getattr(objective, "needs_reference", False):
        rows = len(data.train) + len(data.eval)
        with Phase(console, "reference log-probs of every pair (once, before the first step)", rows, "rows",
                   acc.is_main_process) as phase:
            objective.reference = reference_logps(
                model, data, collate, tokenizer.pad_token_id, acc, autocast, cfg.micro_batch_size, run_dir,
                disable_adapter=recipe.model.adapter is not None and recipe.preference.reference == "base", phase=phase)
    metrics = MetricsLog(run_dir / "metrics.jsonl" if acc.is_main_process else None,
                         run_dir / "tensorboard" if cfg.tensorboard else None, tracker)

    eval_before_on = evaluate_held_out and cfg.eval_before
    progress = TrainProgress(total_steps, console, cfg.log_every, acc.is_main_process,
                             cfg.eval_every if evaluate_held_out else 0, evaluate_held_out)

    held_stats: dict[int, dict] = {}

    def evaluate(step: int) -> float:
        t0 = time.perf_counter()
        progress.hold(True)  # the pass prints its own lines
        batches = eval_order(data.eval, cfg.micro_batch_size)[acc.process_index :: acc.num_processes]
        with Phase(console, f"held-out pass at step {step}", len(batches), "batches", acc.is_main_process) as phase:
            loss, stats = held_out_mean(model, objective, data.eval, batches, tokenizer.pad_token_id, acc, autocast,
                                         phase.advance)
        progress.hold(False)
        progress.held_out_pass(time.perf_counter() - t0)
        held_stats[step] = stats
        metrics.write(step=step, eval_loss=loss, **{f"eval_{k}": v for k, v in stats.items()},
                      eval_s=round(time.perf_counter() - t0, 2))
        say(f"held-out loss at step {step}: {loss:.4f}" + "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in stats.items()))
        return loss

    def save(step: int) -> Path:
        state = {"step": step, "micro_step": step * cfg.grad_accum, "epoch": step // steps_per_epoch,
                 "offset_in_epoch": step % steps_per_epoch, "seed": cfg.seed, "recipe_sha256": recipe_sha,
                 "tokens": tokens_seen, "loss": loss, "skipped_steps": skipped, "eval_loss_before": eval_before,
                 "best_eval_loss": best, "evals_without_improvement": waited,
                 "scheduler": scheduler.state_dict(), "data_fingerprint": data_fingerprint}
        return checkpoint.save(run_dir / "checkpoints", step, acc.unwrap_model(model), optimizer, state, cfg.keep_last, acc)

    if eval_before is None and eval_before_on:
        eval_before = evaluate(0)
    elif eval_before is None and evaluate_held_out:
        say("held-out pass before training: skipped (train.eval_before: false); summary.json has no eval_loss_before")
    if ckpt is not None:
        checkpoint.restore_rng(ckpt, rank)  # last, so nothing above consumes the restored randomness

    # ---- the loop: step s reads micro-batches [k*accum, (k+1)*accum) of epoch s // steps_per_epoch ----
    started, done, bad, orders = time.perf_counter(), start, 0, {}
    # A run that stopped early is over: resumed from its last checkpoint, it must not train on.
    stopped_early = bool(cfg.early_stopping_patience) and waited >= cfg.early_stopping_patience
    last = start if stopped_early else total_steps
    nan_at = os.environ.get(checkpoint.FAULT_ENV)  # test hook, read once rather than per micro-batch
    extra = (getattr(signal, f"SIG{save_on_signal.upper().removeprefix('SIG')}"),) if save_on_signal else ()
    # Under autocast, peft's LoRA layers would copy each input to the adapter's fp32 and autocast would copy
    # it back to bf16 for the matmul: two copies per adapted layer and step, for nothing.
    lean_casts = disable_input_dtype_casting(model, active=precision in ("bf16", "fp16"))
    with resume_from.StopSignals(extra) as stop, progress, lean_casts:
        for step in range(start, last):
            epoch, k = divmod(step, steps_per_epoch)
            if epoch not in orders:  # the order depends only on (seed, epoch): resume lands on the same batches
                orders = {epoch: epoch_order(len(data.train), cfg.micro_batch_size, cfg.seed, epoch, world, lengths)[rank::world]}
            t0 = time.perf_counter()
            groups = [[data.train[i] for i in idx] for idx in orders[epoch][k * cfg.grad_accum : (k + 1) * cfg.grad_accum]]
            indices = orders[epoch][k * cfg.grad_accum : (k + 1) * cfg.grad_accum]
            batches = [collate(rows, tokenizer.pad_token_id) for rows in groups]
            # Each term of the objective is averaged over its counts (label tokens, pairs) of the WHOLE optimizer
            # step on ALL processes, so accumulation and DDP equal one big batch. DDP averages gradients over
            # processes, hence the factor `world`.
            n_step = acc.reduce(sum(objective.counts(b) for b in batches).to(acc.device), "sum").clamp(min=1)
            model.train()
            sums, stats = torch.zeros_like(n_step), torch.zeros(len(objective.stat_names), device=acc.device)
            for i, (batch, idx) in enumerate(zip(batches, indices)):
                batch = {key: v.to(acc.device) for key, v in batch.items()}
                if objective.reference is not None:
                    batch = objective.attach(batch, "train", idx)
                sync = nullcontext() if i == len(batches) - 1 else acc.no_sync(model)
                with sync:
                    with autocast():
                        terms = objective.terms(model, batch)
                    part = terms.sums.float()
                    if nan_at == f"nan-loss:{step + 1}":
                        part = part * float("nan")  # test hook: a numerically broken step
                    acc.backward((part / n_step).sum() * world)
                sums += part.detach()
                stats += torch.tensor([terms.stats[name] for name in objective.stat_names], device=acc.device)
                checkpoint.fault(f"micro:{step + 1}:{i}")
            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            loss = float((acc.reduce(sums, "sum") / n_step).sum())
            shown = dict(zip(objective.stat_names, (acc.reduce(stats, "sum") / n_step[-1]).tolist()))
            lr = scheduler.get_last_lr()[0]
            if math.isfinite(loss) and math.isfinite(float(grad_norm)):
                optimizer.step()
                bad = 0
            else:  # skip the update, keep the adapter as it was; the data and the schedule move on
                skipped, bad = skipped + 1, bad + 1
                say(f"[yellow]warning:[/] step {step + 1}: loss {loss} / gradient norm {float(grad_norm)}: update skipped")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1

            real = sum(e.length for rows in groups for row in rows for e in row)
            n_tokens = int(acc.reduce(torch.tensor(real, device=acc.device), "sum"))
            tokens_seen += n_tokens
            progress.update(done, loss, lr, n_tokens, time.perf_counter() - t0)
            if done % cfg.log_every == 0 or done == total_steps:
                metrics.write(step=done, epoch=epoch, loss=loss, **shown, lr=lr, tokens=tokens_seen, **progress.rates(),
                              elapsed_s=round(time.perf_counter() - started, 2))
            checkpoint.fault(f"step:{done}")
            if bad >= cfg.max_bad_steps:
                path = save(done)
                raise LlamatuneError(
                    f"{bad} consecutive steps had a NaN/Inf loss or gradient (each update skipped) at step {done}; "
                    f"stopping. The adapter was never updated by them: checkpoint {path}. Lower train.lr, check the data, "
                    "or use float32."
                )
            # Evaluate before saving, so a checkpoint carries the early-stopping state of its own step.
            if evaluate_held_out and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
                held = evaluate(done)
                # "Improved" means lower by more than 1e-4: float noise must not reset the patience.
                best, waited = (held, 0) if held < best - 1e-4 else (best, waited + 1)
                if cfg.early_stopping_patience and waited >= cfg.early_stopping_patience:
                    say(f"early stop at step {done}: no lower held-out loss in {waited} evaluations (best {best:.4f})")
                    last = done
            if stop.requested or (cfg.save_every and (done % cfg.save_every == 0 or done in (total_steps, last))):
                path = save(done)
                if stop.requested:
                    metrics.close()
                    raise resume_from.Preempted(
                        f"stopped by {signal.Signals(stop.requested).name} at step {done}; checkpoint {path} is complete. "
                        f"Continue with: llamatune train RECIPE --resume auto --run-dir {run_dir}"
                    )
            if done == last:
                break
    train_s = time.perf_counter() - started
    eval_after = evaluate(last) if evaluate_held_out else None

    # ---- artifacts -----------------------------------------------------------------------------
    ran = done - start  # steps trained by this process: a run resumed at its last step trains none
    summary = {
        "run_dir": str(run_dir.resolve()),
        "base_model": ref,
        "steps": last,
        "planned_steps": total_steps,
        "resumed_from_step": start or None,
        "skipped_steps": skipped,
        "tokens": tokens_seen,
        # this session's tokens (all processes) over its step time, held-out passes excluded (tokens_seen counts
        # earlier sessions too); recent: the last steps, which a warm-up does not drag down
        "tokens_per_s": progress.rates()["tokens_per_s"] if ran else None,
        "tokens_per_s_recent": progress.rates()["tokens_per_s_recent"] if ran else None,
        "train_wall_s": round(train_s, 2),
        "model_load_s": round(load_s, 2),
        "final_train_loss": loss,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "method": cfg.method,
        "trainable_params": trainable,
        "total_params": total,
        "processes": world,
        "device": str(acc.device),
        "precision": precision,
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "allocator": active_allocator(),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "data": totals,
        "data_fingerprint": data_fingerprint,
    }
    if held_stats and objective.stat_names:  # preference runs: reward accuracy and margins of the held-out pairs, before and after
        summary["eval_stats_before"], summary["eval_stats_after"] = held_stats.get(0), held_stats.get(last)
    if not ran:
        reason = f"no step ran in this session: resumed at step {start} of {total_steps}"
        summary["null_reasons"] = {"tokens_per_s": reason, "tokens_per_s_recent": reason}
    if eval_before is None and evaluate_held_out:
        summary.setdefault("null_reasons", {})["eval_loss_before"] = "train.eval_before: false skipped the pass"
    acc.wait_for_everyone()
    metrics.close()
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "tokenizer")
        summary["vllm_lora"] = vllm_lora_check(run_dir / "adapter")
        write_loss_curve(run_dir)
        scrub(run_dir, redactor_of(recipe))  # peft and transformers write the base model's path themselves
        if tracker is not None:
            summary["tracking"] = tracker.info
        # last: summary.json beside adapter/ marks a finished run
        write_summary(run_dir, redactor_of(recipe).data(summary))
        if tracker is not None:
            tracker.log_record({"step": last, **{f"summary.{k}": v for k, v in summary.items() if k != "steps"}})
            tracker.log_files(run_dir)
    say(f"[bold green]done[/] run directory: {run_dir}"
        + (f"  held-out loss {eval_before:.4f} → {eval_after:.4f}" if eval_after is not None and eval_before is not None
           else f"  held-out loss {eval_after:.4f}" if eval_after is not None else ""))
    return TrainResult(summary=summary, model=acc.unwrap_model(model))
