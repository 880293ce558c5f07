"""`llamatune runs [DIR]` and `llamatune runs compare A B [C...]`: what the run directories in a folder are, side by
side, read from the files every run writes (recipe.yaml, summary.json, metrics.jsonl, checkpoints/, eval/eval.json).

A run is never loaded as a model here: listing a hundred runs reads a few small files each. A file that is damaged
(not JSON, not YAML) does not stop the listing: its run's status says which file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llamatune.errors import RecipeError

# The metric a run's eval headline shows: the first of these that its eval.json has.
HEADLINE = ("accuracy", "macro_f1", "f1", "exact_match", "rouge_l", "perplexity")


@dataclass
class RunInfo:
    """What one run directory says about itself."""

    path: str
    name: str
    status: str  # finished | stopped at step N, resumable from M | running | no step ran | damaged: FILE
    base: str | None = None
    method: str | None = None
    steps: int | None = None
    planned_steps: int | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    final_train_loss: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    train_wall_s: float | None = None
    peak_rss_gib: float | None = None
    started: float = 0.0  # recipe.yaml's mtime: written first, so the start of the run
    eval: dict = field(default_factory=dict)  # metric -> {"tuned": est, "base": est, "delta": est}
    recipe: dict = field(default_factory=dict)  # flattened resolved recipe, dotted keys

    def headline(self) -> str:
        """e.g. `accuracy 0.812 (base 0.655)`, or '' without an eval."""
        for name in HEADLINE:
            if name in self.eval:
                m = self.eval[name]
                return f"{name} {m['tuned']:.3f}" + (f" (base {m['base']:.3f})" if m.get("base") is not None else "")
        return ""


def is_run(path: Path) -> bool:
    """A run directory: recipe.yaml (the first file train writes) in a folder."""
    return path.is_dir() and (path / "recipe.yaml").is_file()


def find_runs(folder: Path) -> list[RunInfo]:
    """The runs directly in `folder` (or `folder` itself when it is one), oldest first.

    Raises:
        RecipeError: If `folder` is not a folder.
    """
    if not folder.is_dir():
        raise RecipeError([f"{folder} is {'a file' if folder.exists() else 'not there'}; give a folder of run directories "
                           "(output.dir of your recipes, `runs` by default)"])
    paths = [folder] if is_run(folder) else sorted(p for p in folder.iterdir() if is_run(p))
    return sorted((read_run(p) for p in paths), key=lambda r: (r.started, r.name))


def read_run(path: Path) -> RunInfo:
    """Everything the listing and the comparison show about one run directory; never raises for a damaged file."""
    info = RunInfo(path=str(path), name=path.name, status="no step ran (failed or stopped at start-up)")
    info.started = (path / "recipe.yaml").stat().st_mtime
    damaged = []
    recipe = _yaml(path / "recipe.yaml", damaged)
    if isinstance(recipe, dict):
        info.recipe = flatten(recipe)
        info.base = info.recipe.get("model.path")
        info.method = _method(info.recipe)
        info.planned_steps = info.recipe.get("train.max_steps")
    steps = _metric_lines(path / "metrics.jsonl", damaged)
    train_steps = [m for m in steps if "loss" in m]
    if train_steps:
        last = train_steps[-1]
        info.steps, info.final_train_loss = last.get("step"), last.get("loss")
        info.tokens_per_s = last.get("tokens_per_s")
    held = [m for m in steps if "eval_loss" in m]
    if held:
        info.eval_loss_before = held[0]["eval_loss"] if held[0].get("step") == 0 else None
        info.eval_loss_after = held[-1]["eval_loss"] if held[-1].get("step") else None
    checkpoints = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    summary_file = path / "summary.json"
    if summary_file.exists():
        summary = _json(summary_file, damaged)
        if isinstance(summary, dict):
            _from_summary(info, summary)
            info.status = "finished" if (path / "adapter").is_dir() else "damaged: adapter/ is missing"
    elif _locked(path):
        info.status = "running" + (f", at step {info.steps}" if info.steps else "")
    elif checkpoints or info.steps:
        saved = [int(c.name.split("-")[1]) for c in checkpoints if c.name.split("-")[1].isdigit()]
        info.status = f"stopped at step {max(saved + [info.steps or 0])}, " + \
            (f"resumable from step {max(saved)}" if saved else "no checkpoint")
    evaluated = path / "eval" / "eval.json"
    if evaluated.exists():
        report = _json(evaluated, damaged)
        if isinstance(report, dict):
            info.eval = {name: {k: v[0] for k, v in m.items() if k in ("tuned", "base", "delta", "ratio") and v}
                         for name, m in (report.get("metrics") or {}).items() if isinstance(m, dict) and m.get("tuned")}
    if damaged:
        info.status = f"damaged: {', '.join(damaged)}"
    return info


def _from_summary(info: RunInfo, summary: dict) -> None:
    for key in ("steps", "planned_steps", "eval_loss_before", "eval_loss_after", "final_train_loss", "tokens",
                "tokens_per_s", "train_wall_s", "peak_rss_gib"):
        if key in summary:
            setattr(info, key, summary[key])
    info.base = summary.get("base_model", info.base)


def _method(recipe: dict) -> str:
    """sft/dpo/... (train.method when recipes have it) and the adapter kind: lora, qlora (nf4), int8, dora."""
    kind = {"nf4": "qlora", "int8": "lora int8"}.get(recipe.get("quantization.mode"), "lora")
    if recipe.get("lora.use_dora"):
        kind = "dora" if kind == "lora" else f"{kind} dora"
    return f"{recipe.get('train.method', 'sft')} {kind} r={recipe.get('lora.r', '?')}"


def _locked(path: Path) -> bool:
    """Whether a llamatune process holds this run's lock now (it is being trained)."""
    import fcntl

    from llamatune.lock import lock_path

    lock = lock_path(path)
    if not lock.exists():
        return False
    try:
        with open(lock, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return False
    except OSError:
        return True


def flatten(mapping: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; a list of sections (data.train) by index: data.train.0.path."""
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


def _yaml(path: Path, damaged: list[str]):
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        damaged.append(path.name)
        return None


def _json(path: Path, damaged: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        damaged.append(str(path.relative_to(path.parent.parent)) if path.parent.name == "eval" else path.name)
        return None


def _metric_lines(path: Path, damaged: list[str]) -> list[dict]:
    """metrics.jsonl's records; a torn last line (a run killed while writing it) is skipped, a bad line before
    the last marks the file damaged."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        damaged.append(path.name)
        return []
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                damaged.append(f"{path.name} line {i + 1}")
                break
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def command(args: list[str], as_json: bool, console: Console) -> None:
    """`llamatune runs [DIR]` or `llamatune runs compare A B [C...]` (one command: a folder argument and a subcommand
    cannot share a click group).

    Raises:
        RecipeError: For arguments that name no run directories.
    """
    if args and args[0] == "compare":
        if len(args) < 3:
            raise RecipeError(["runs compare: give at least two run directories, e.g. llamatune runs compare runs/a runs/b"])
        missing = [a for a in args[1:] if not is_run(Path(a))]
        if missing:
            raise RecipeError([f"runs compare: {m} is not a run directory (no recipe.yaml in it)" for m in missing])
        found = [read_run(Path(a)) for a in args[1:]]
    elif len(args) > 1:
        raise RecipeError([f"runs: one folder to list, not {len(args)}; to compare runs: llamatune runs compare A B"])
    else:
        folder = Path(args[0] if args else "runs")
        found = find_runs(folder)
    if as_json:
        console.print(as_json_text(found), highlight=False, markup=False, soft_wrap=True)
    elif args and args[0] == "compare":
        compare(found, console)
    else:
        show_list(found, folder, console)


# ---- output ------------------------------------------------------------------------------------------------------

def show_list(runs: list[RunInfo], folder: Path, console: Console) -> None:
    """The table of `llamatune runs`."""
    if not runs:
        console.print(f"no run directories in {escape(str(folder))} (a run directory holds recipe.yaml)", highlight=False)
        return
    table = Table(title=f"runs in {escape(str(folder))}", title_justify="left")
    evaluated = any(r.eval for r in runs)  # no empty eval column on a narrow terminal
    for column, kwargs in (("run", {"overflow": "fold"}), ("base", {"overflow": "ellipsis", "max_width": 16}),
                           ("method", {}), ("steps", {"justify": "right"}), ("held-out loss", {"justify": "right"}),
                           *([("eval", {})] if evaluated else []), ("wall", {"justify": "right"}), ("status", {})):
        table.add_column(column, **kwargs)
    for r in runs:
        steps = f"{r.steps if r.steps is not None else '–'}" + (f"/{r.planned_steps}" if r.planned_steps else "")
        cells = [escape(r.name), escape(Path(r.base).name if r.base else "–"), r.method or "–", steps, _loss(r)]
        table.add_row(*cells, *([r.headline() or "–"] if evaluated else []), _wall(r.train_wall_s), escape(r.status))
    console.print(table)


def compare(runs: list[RunInfo], console: Console) -> None:
    """The recipe keys whose values differ, then the numbers side by side."""
    names = [r.name for r in runs]
    keys = sorted({k for r in runs for k in r.recipe})
    differ = [k for k in keys if len({json.dumps(r.recipe.get(k, "<not set>"), sort_keys=True, default=str) for r in runs}) > 1]
    table = Table(title="recipe differences", title_justify="left")
    table.add_column("key")
    for name in names:
        table.add_column(escape(name), overflow="fold")
    for key in differ:
        table.add_row(key, *(escape(_value(r.recipe.get(key, "(not set)"))) for r in runs))
    console.print(table if differ else "recipe differences: none (the same resolved recipe)", highlight=False)
    numbers = Table(title="results", title_justify="left")
    numbers.add_column("")
    for name in names:
        numbers.add_column(escape(name), justify="right")
    rows = [("status", lambda r: r.status), ("steps", lambda r: r.steps), ("tokens", lambda r: r.tokens),
            ("tokens/s (average)", lambda r: r.tokens_per_s), ("train wall time", lambda r: _wall(r.train_wall_s)),
            ("final train loss", lambda r: r.final_train_loss), ("held-out loss before", lambda r: r.eval_loss_before),
            ("held-out loss after", lambda r: r.eval_loss_after), ("peak memory GiB", lambda r: r.peak_rss_gib)]
    for metric in sorted({m for r in runs for m in r.eval}):
        rows.append((f"eval {metric}", lambda r, m=metric: _eval_cell(r.eval.get(m))))
    for label, get in rows:
        numbers.add_row(label, *(escape(_value(get(r))) for r in runs))
    console.print(numbers)


def as_json_text(runs: list[RunInfo]) -> str:
    """Machine-readable output of both commands (--json)."""
    return json.dumps([asdict(r) for r in runs], indent=2, default=str)


def _loss(r: RunInfo) -> str:
    before = f"{r.eval_loss_before:.3f}" if r.eval_loss_before is not None else "–"
    after = f"{r.eval_loss_after:.3f}" if r.eval_loss_after is not None else "–"
    return "–" if before == after == "–" else f"{before} → {after}"


def _wall(seconds: float | None) -> str:
    from llamatune.progress import duration

    return duration(seconds) if seconds is not None else "–"


def _eval_cell(m: dict | None) -> str:
    if not m:
        return "–"
    text = f"{m['tuned']:.4f}"
    if m.get("base") is not None:
        text += f" (base {m['base']:.4f})"
    return text


def _value(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
