"""What the training loop minimizes, by train.method: the same loop, batches and run directory for every method.

An objective turns one batch into summed terms and says what each term is averaged over (label tokens, pairs).
The loop adds the counts of the whole optimizer step on all processes before the first backward, so gradient
accumulation and several processes give the loss of one big batch, whatever the method.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamatune.data.batches import collate
from llamatune.data.encode import IGNORE_INDEX
from llamatune.train.loss import summed_loss
from llamatune.train import preference as pref

REFERENCE_FILE = "reference_logps.pt"


@dataclass
class Terms:
    """One batch's contribution: `sums[k]` is averaged over `counts[k]` of the step (for the loss), `stats` are
    sums averaged over `counts[-1]` (the pairs) for the log."""

    sums: torch.Tensor
    counts: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


class SFT:
    """Next-token cross-entropy on the answers, averaged over the step's label tokens."""

    method = "sft"
    stat_names: tuple[str, ...] = ()
    reference = None

    def counts(self, batch: dict) -> torch.Tensor:
        return torch.tensor([float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())])

    def attach(self, batch: dict, split: str, rows: list[int]) -> dict:
        return batch

    def terms(self, model, batch: dict) -> Terms:
        summed, _ = summed_loss(model, batch)
        return Terms(summed[None], self.counts(batch))


class Preference:
    """DPO (sigmoid / ipo / simpo) or ORPO on chosen / rejected pairs; losses averaged over the step's pairs (ORPO's
    next-token term over its chosen tokens, as its paper and TRL do)."""

    def __init__(self, method: str, spec, reference: dict | None = None):
        self.method, self.spec = method, spec
        self.reference = reference  # {"train": [row -> [pairs, 2]], "eval": [...]} for the DPO losses that use one
        self.needs_reference = method == "dpo" and spec.loss != "simpo"
        self.stat_names = ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected") + (
            ("log_odds_ratio", "nll") if method == "orpo" else ("nll",) if spec.sft_weight > 0 else ())

    @property
    def next_token_term(self) -> bool:
        """ORPO's chosen-answer next-token loss, or DPO's with preference.sft_weight: averaged over chosen tokens."""
        return self.method == "orpo" or self.spec.sft_weight > 0

    def counts(self, batch: dict) -> torch.Tensor:
        pairs = float(batch["pairs"])
        if self.next_token_term:
            chosen = float((batch["pair_index"] % 2 == 0).sum())
            return torch.tensor([chosen, pairs])
        return torch.tensor([pairs])

    def terms(self, model, batch: dict) -> Terms:
        logps, counts = pref.pair_logps(model, batch)
        if self.method == "orpo":
            odds_term, log_odds = pref.orpo_losses(logps, counts, self.spec.orpo_lambda)
            nll = -logps[:, 0].sum()
            sums = torch.stack([nll, odds_term.sum()])
            margin = log_odds
            extra = {"log_odds_ratio": float(log_odds.detach().sum()), "nll": float((-logps[:, 0].detach() / counts[:, 0]).sum())}
            shown = (logps / counts).detach()  # ORPO's log-probs are per token, as TRL logs them
        else:
            losses, rewards = pref.dpo_losses(logps, counts, batch.get("ref_logps"), self.spec.loss, self.spec.beta,
                                              self.spec.label_smoothing, self.spec.simpo_gamma)
            sums = losses.sum()[None]
            margin = rewards[:, 0] - rewards[:, 1]
            extra = {}
            if self.spec.sft_weight > 0:
                nll = -logps[:, 0].sum()
                sums = torch.stack([self.spec.sft_weight * nll, sums[0]])
                extra = {"nll": float((-logps[:, 0].detach() / counts[:, 0]).sum())}
            shown = logps.detach()
        margin = margin.detach()  # a statistic: float() of a tensor that needs a gradient warns on every step
        stats = {"reward_accuracy": float((margin > 0).float().sum()), "reward_margin": float(margin.sum()),
                 "logps_chosen": float(shown[:, 0].sum()), "logps_rejected": float(shown[:, 1].sum()), **extra}
        return Terms(sums, self.counts(batch), stats)

    def attach(self, batch: dict, split: str, rows: list[int]) -> dict:
        """Adds the reference log-probs of these rows (in the batch's pair order: row by row) to the batch."""
        if self.needs_reference:
            batch["ref_logps"] = torch.cat([self.reference[split][i] for i in rows]).to(batch["input_ids"].device)
        return batch


class Distill(SFT):
    """kd_ratio x the distillation loss on the teacher's cached top-k + (1 - kd_ratio) x next-token cross-entropy,
    averaged over the step's label tokens (train/distill.py)."""

    method = "distill"
    stat_names = ("kd_loss", "ce_loss", "teacher_top1_agreement")

    def __init__(self, spec, reference: dict | None = None):
        self.spec = spec
        self.reference = reference  # {"train": [row -> (top [n, k], logp [n, k(+1)])], "eval": [...]}: teacher.targets

    def attach(self, batch: dict, split: str, rows: list[int]) -> dict:
        """Adds the teacher's top tokens and grouped log-probs of these rows (their trained positions, row-major)."""
        cached = [self.reference[split][i] for i in rows]
        batch["teacher_top"] = torch.cat([c[0] for c in cached]).long().to(batch["input_ids"].device)
        batch["teacher_logp"] = torch.cat([c[1] for c in cached]).to(batch["input_ids"].device)
        return batch

    def terms(self, model, batch: dict) -> Terms:
        from llamatune.train.distill import distill_terms

        mixed, ce, kd, agree = distill_terms(model, batch, self.spec.temperature, self.spec.kd_ratio, self.spec.loss)
        stats = {"kd_loss": float(kd.sum()), "ce_loss": float(ce.sum()), "teacher_top1_agreement": float(agree.sum())}
        return Terms(mixed.sum()[None], self.counts(batch), stats)


def objective_for(recipe) -> SFT | Preference | Distill:
    """The recipe's objective (its reference log-probs or teacher targets, when it needs them, are filled in by
    `reference_logps` / `teacher.targets`)."""
    if recipe.train.method == "sft":
        return SFT()
    if recipe.train.method == "distill":
        return Distill(recipe.distill)
    return Preference(recipe.train.method, recipe.preference)


def reference_logps(model, data, collate, pad_id: int, acc, autocast, batch_size: int, run_dir: Path,
                    disable_adapter: bool, phase=None) -> dict:
    """The reference model's summed log-probs of every pair of every row, train and held-out: computed once (by
    all processes, each a share of the rows) and written to the run directory, or read back from it on resume.

    Args:
        disable_adapter: Score with the adapter disabled (the base model: preference.reference base while
            model.adapter set a starting adapter); otherwise the model as it is before the first step.
    """
    from accelerate.utils import gather_object

    path = run_dir / REFERENCE_FILE
    if path.is_file():
        return torch.load(path, weights_only=True)
    unwrapped = acc.unwrap_model(model)
    context = unwrapped.disable_adapter() if disable_adapter else nullcontext()
    model.eval()
    found: dict[str, list] = {}
    with torch.no_grad(), context:
        for split, rows in (("train", data.train), ("eval", data.eval)):
            mine = list(range(acc.process_index, len(rows), acc.num_processes))
            scored = []
            for start in range(0, len(mine), batch_size):
                idx = mine[start : start + batch_size]
                batch = {k: v.to(acc.device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
                with autocast():
                    logps, _ = pref.pair_logps(model, batch)
                per_row = [len(rows[i]) for i in idx]
                scored += list(zip(idx, logps.float().cpu().split(per_row)))
                if phase is not None:
                    phase.advance(len(idx) * acc.num_processes)
            everything = gather_object(scored) if acc.num_processes > 1 else scored
            table = dict(everything)
            found[split] = [table[i] for i in range(len(rows))]
    if acc.is_main_process:
        torch.save(found, path)
    return found


def held_out_mean(model, objective, rows, batches: list, pad_id: int, acc, autocast, tick) -> tuple[float, dict]:
    """The objective's mean over the held-out examples (this process's `batches` of row indices), summed across
    processes, with its statistics (preference runs: reward accuracy, margin, log-probs); `tick()` after each batch."""
    model.eval()
    width = len(objective.counts(collate([rows[0]], pad_id))) if rows else 1
    sums, counts = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
    stats = torch.zeros(len(objective.stat_names), dtype=torch.float64)
    with torch.no_grad():
        for idx in batches:
            batch = {k: v.to(acc.device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
            if objective.reference is not None:
                batch = objective.attach(batch, "eval", idx)
            with autocast():
                terms = objective.terms(model, batch)
            sums += terms.sums.detach().double().cpu()
            counts += terms.counts.double()
            stats += torch.tensor([terms.stats[name] for name in objective.stat_names], dtype=torch.float64)
            tick()
    # float64 does not cross every backend (MPS, some collectives): the sums travel as float32
    sums = acc.reduce(sums.float().to(acc.device), "sum").double()
    counts = acc.reduce(counts.float().to(acc.device), "sum").double().clamp(min=1)
    stats = acc.reduce(stats.float().to(acc.device), "sum").double() / counts[-1]
    return float((sums / counts).sum()), dict(zip(objective.stat_names, stats.tolist()))
