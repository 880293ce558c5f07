"""Command line: parse arguments, load the recipe, call one function. Nothing heavy at import time
(torch & co. load inside the commands), so `llamatune --help` and `llamatune validate` are instant.

Exit codes: 0 success, 2 invalid recipe or arguments, 1 runtime error with a message.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from llamatune import __version__
from llamatune.errors import LlamatuneError, RecipeError
from llamatune.terminal import App as _App
from llamatune.terminal import Group as _Group
from llamatune.terminal import out
from llamatune.terminal import quiet_libraries as _quiet_libraries
from llamatune.terminal import run as _run
from llamatune.cli_common import RecipeArg, SetOpt
from llamatune.cli_common import load_checked as _load_checked
from llamatune.cli_common import use_recipe as _use_recipe
from llamatune.cli_common import use_run as _use_run
from llamatune.cli_groups import data_app, models_app

app = _App(
    cls=_Group,
    help="Fine-tune Llama-family models with LoRA/QLoRA from YAML recipes, offline, on CPU or GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # bugs get a plain traceback; user errors never reach here
)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")

def _version(value: bool) -> None:
    if value:
        out.print(f"llamatune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Fine-tune Llama-family models with LoRA/QLoRA."""


@app.command()
def train(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write the run here instead of output.dir/output.name."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (newest complete checkpoint of the run, or a fresh "
                                         "start) or a checkpoint folder."),
    force_resume: bool = typer.Option(False, "--force-resume", metavar="", help="Resume even if the recipe or data changed."),
    save_on_signal: Optional[str] = typer.Option(None, "--save-on-signal", help="Also checkpoint and stop on this signal, "
                                                 "e.g. USR1 with Slurm's --signal=USR1@120."),
    no_eval_before: bool = typer.Option(False, "--no-eval-before", metavar="", help="Skip the held-out pass before the first step "
                                        "(the same as --set train.eval_before=false; recorded in the run's recipe)."),
) -> None:
    """Fine-tune a LoRA adapter as RECIPE says and write a run directory.

    Exit 75 after SIGTERM/SIGINT once a checkpoint is complete: run again with --resume auto.
    """

    def body() -> None:
        parsed, _ = _load_checked(recipe, [*(overrides or []), *(["train.eval_before=false"] if no_eval_before else [])])
        if save_on_signal is not None:
            import signal

            if not hasattr(signal, "SIG" + save_on_signal.upper().removeprefix("SIG")):
                raise RecipeError([f"--save-on-signal: unknown signal {save_on_signal!r}; e.g. USR1, USR2"])
        _quiet_libraries()
        from llamatune.train.loop import train as run_training
        # train() runs the same checks as validate (preflight.check) before it loads any weight.
        run_training(parsed, recipe_name=recipe.stem, run_dir=run_dir, console=out, resume=resume, force_resume=force_resume,
                     save_on_signal=save_on_signal, source=str(recipe))

    _run(body)


@app.command()
def validate(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    launch: Optional[Path] = typer.Option(None, "--launch", help="An accelerate config file (examples/accelerate/): "
                                          "also reject recipe/launch combinations known not to work."),
) -> None:
    """Check RECIPE as train would before its first step, without loading any weights: schema, files, model
    reference and module names, and the whole data pipeline (reading, templates, tokenization, drops, split, overlap)."""

    def body() -> None:
        parsed, _ = _load_checked(recipe, overrides)
        if launch is not None:
            from llamatune.launch import launch_problems, read_launch_config

            problems = launch_problems(parsed, read_launch_config(launch))
            if problems:
                raise RecipeError(problems, source=f"{recipe} with {launch}")
        _quiet_libraries()
        from llamatune.preflight import check

        checked = check(parsed, str(recipe), say=out.print)
        t = checked.data.manifest["totals"]
        out.print(f"[green]ok[/] {escape(str(recipe))}: model {escape(parsed.model.path)} ({checked.kind}); "
                  f"{t['train_examples']} train / {t['eval_examples']} held-out examples, {t['train_label_tokens']:,} "
                  f"trained tokens; LoRA on {parsed.lora.target_modules}", highlight=False)

    _run(body)


@app.command("init")
def init_command(
    folder: Path = typer.Argument(Path("."), help="Where to write recipe.yaml and data/ (created if missing)."),
    domain: str = typer.Option(..., "--domain", help="medical | legal | finance: the example rows and labels to start from."),
) -> None:
    """Scaffold a commented recipe and data templates for your own corpus; never overwrites a file."""

    def body() -> None:
        from llamatune.scaffold import init_project

        written = init_project(domain, folder)
        for path in written:
            out.print(f"wrote {path}")
        out.print(f"next: replace the rows in {folder / 'data'}, then llamatune validate {folder / 'recipe.yaml'}")

    _run(body)


@app.command("plan")
def plan_command(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    device: str = typer.Option("cpu", "--device", help="cpu (this machine) | a100-40gb | a100-80gb | h100-80gb | "
                               "h200-141gb | l4-24gb | a10g-24gb | rtx4090-24gb | rtx3090-24gb | t4-16gb | v100-16gb"),
) -> None:
    """Estimate RECIPE's peak memory on a device (weights, adapter, optimizer, activations, logits) and suggest a micro-batch."""

    def body() -> None:
        from llamatune.train import plan as planning

        parsed, _ = _load_checked(recipe, overrides)
        if device != "cpu" and device not in planning.DEVICES:
            raise RecipeError([f"--device: {device!r} is not one of cpu, {', '.join(planning.DEVICES)}"])
        _quiet_libraries()
        from transformers import AutoConfig

        from llamatune.preflight import check

        runtime = planning.runtime_resident_bytes() if device == "cpu" else int(0.75 * planning.GiB)
        checked = check(parsed, str(recipe), say=out.print)
        totals = checked.data.manifest["totals"]
        target = planning.this_machine() if device == "cpu" else planning.DEVICES[device]
        planning.show(planning.estimate(parsed, AutoConfig.from_pretrained(checked.ref), target, totals["longest_row"],
                                        runtime), out)

    _run(body)


@app.command("bench")
def bench_command(
    recipe: Path = RecipeArg,
    overrides: Optional[List[str]] = SetOpt,
    steps: int = typer.Option(5, "--steps", min=2, help="Training steps to time (the first one is not counted)."),
    profile: bool = typer.Option(False, "--profile", metavar="", help="Also list the operations that took the most time."),
    save: Optional[Path] = typer.Option(None, "--save", help="Also write the numbers as JSON to this file."),
) -> None:
    """Time a few real training steps of RECIPE here: tokens/s, peak memory, and the projected time of the full run."""

    def body() -> None:
        _load_checked(recipe, overrides)
        if save is not None:
            from llamatune.artifacts.files import check_output

            check_output(save, "--save")  # before minutes of steps, not after
        _quiet_libraries()
        from llamatune import strictjson
        from llamatune.train.bench import run_bench

        report = run_bench(recipe, overrides or [], steps, out, profile)
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            strictjson.write(save, report)
            out.print(f"numbers written to {save.resolve()}", highlight=False)

    _run(body)


@app.command()
def schema(key: Optional[str] = typer.Argument(None, help="One key or section, e.g. data.train.messages or lora.",
                                               show_default=False)) -> None:
    """Print every recipe key (or KEY and the keys below it) with its type, default and meaning."""
    from llamatune.schema_doc import show

    _run(lambda: show(key, lambda text: out.print(text, highlight=False)))


@app.command("merge")
def merge_command(
    run: Path = typer.Argument(..., help="A run directory.", show_default=False),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/merged); never overwritten."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16 | fp16: dtype of the merged weights."),
    verify: bool = typer.Option(True, "--verify/--no-verify", metavar="", help="Refuse to write if the merged model's logits drift "
                                "from base+adapter beyond the dtype's threshold."),
) -> None:
    """Merge RUN's adapter into its full-precision base; verify parity; write a plain transformers folder."""

    def body() -> None:
        _use_run(run)
        if dtype not in ("fp32", "bf16", "fp16"):
            raise RecipeError([f"--dtype: {dtype!r}; choose fp32, bf16 or fp16"])
        from llamatune.artifacts.files import FIX_RUN, run_dir_problem

        if not run.is_dir() or not ((run / "recipe.yaml").exists() or (run / "adapter").exists()):
            raise RecipeError([f"{run}: not a run directory (recipe.yaml + adapter/), the folder llamatune train writes"])
        missing = run_dir_problem(run)  # a run with a part missing or misplaced: name it
        if missing:
            raise LlamatuneError(f"{missing}; {FIX_RUN}")
        _quiet_libraries()
        from llamatune.artifacts.merge import merge

        merge(run, out_dir, dtype, verify, say=out.print)

    _run(body)


@app.command("prune")
def prune_command(
    model: str = typer.Argument(..., help="The model to prune: a builtin alias, a local folder or a .gguf.", show_default=False),
    keep_layers: int = typer.Option(..., "--keep-layers", min=1, help="Decoder layers to keep (e.g. two thirds of them).",
                                    show_default=False),
    data: Path = typer.Option(..., "--data", help="A recipe whose training examples are the calibration text.",
                              show_default=False),
    out_dir: Path = typer.Option(..., "--out", help="Folder to write the pruned model to; never overwritten.", show_default=False),
    rows: int = typer.Option(32, "--rows", min=1, help="Calibration examples to measure the layers on."),
) -> None:
    """Depth-prune MODEL for a smaller student: drop the layers that change their input least on DATA's examples."""

    def body() -> None:
        _use_recipe(data, [])
        _quiet_libraries()
        from llamatune.artifacts.prune import prune

        prune(model, keep_layers, data, out_dir, rows, say=out.print)

    _run(body)


@app.command("export")
def export_command(
    source: Path = typer.Argument(..., help="A model folder (gguf, ollama), e.g. `llamatune merge` output, or a run "
                                  "directory (gguf-lora, gguf-base, ollama-lora).", show_default=False),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, LM Studio) | ollama (folder: model.gguf + Modelfile) "
                            "| gguf-lora (the run's adapter alone, for llama.cpp --lora) | gguf-base (the run's base, "
                            "once, for its adapters) | ollama-lora (folder: adapter.gguf + Modelfile FROM base, ADAPTER)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="f16 (default) | q8_0 | q6_k | q5_k_m | q5_k_s | q5_1 | q5_0 | "
                                        "q4_k_m | q4_k_s | q4_1 | q4_0: llama.cpp's file types, each with the per-tensor mix "
                                        "its quantizer writes; a gguf-lora adapter is always f32.", show_default=False),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Output file (gguf*) or folder (ollama*); default: beside "
                                            "SOURCE, or inside it for a run."),
    base: Optional[Path] = typer.Option(None, "--base", help="gguf-lora, ollama-lora: the base GGUF the adapter is checked "
                                        "against and paired with; without it ollama-lora writes base.gguf into its folder."),
) -> None:
    """Write a model folder as one self-contained GGUF file, or a run's LoRA adapter as a GGUF adapter for llama.cpp
    and Ollama (pure Python, no llama.cpp tools)."""

    def body() -> None:
        _use_run(source)  # a run's recipe redacts what the commands print
        _quiet_libraries()
        from llamatune.artifacts.export import export

        export(source, fmt, quant, out_file, base, say=out.print)

    _run(body)


@app.command("eval")
def eval_command(
    target: Path = typer.Argument(..., help="A run directory, a merged model folder, or a .gguf file.", show_default=False),
    data: Optional[List[str]] = typer.Option(None, "--data", help="A recipe file (its held-out data) or, for a run, a "
                                             "data file read like its training data. Default: the run's held-out data."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help="'base': also score the base model (adapter "
                                                "off); 'start': the adapter the run started from (model.adapter); "
                                                "'teacher': a distill run's teacher; or another run's directory on the "
                                                "same base; same examples, paired difference. Repeat it for several."),
    generate: bool = typer.Option(True, "--generate/--no-generate", metavar="", help="Generate answers for open questions (EM, F1, ROUGE-L)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N examples."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: RUN/eval)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Generation length limit."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per forward pass."),
) -> None:
    """Score held-out data: answer loss and perplexity, choice accuracy, generation metrics, with 95% intervals."""

    def body() -> None:
        _use_run(target)
        wrong = [c for c in compare or [] if c not in ("base", "start", "teacher") and not Path(c).is_dir()]
        if wrong:
            raise RecipeError([f"--compare: {wrong[0]!r} is not supported; use base, start, teacher or another run's "
                               "directory (on the same base model)"])
        _quiet_libraries()
        from llamatune.evaluate.scoring import run_eval

        run_eval(target, data or [], compare or [], generate, limit, out_dir, max_new_tokens, batch_size, out)

    _run(body)


@app.command("chat")
def chat_command(
    target: Path = typer.Argument(..., help="A run directory, a merged model folder, or a .gguf file.", show_default=False),
    compare: Optional[str] = typer.Option(None, "--compare", help="'base': answer each turn with the adapter off, then on."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    system: Optional[str] = typer.Option(None, "--system", help="A system message for the conversation."),
) -> None:
    """Talk to a fine-tuned model by hand, tokens streamed, with its training chat template."""

    def body() -> None:
        _use_run(target)
        if compare not in (None, "base"):
            raise RecipeError([f"--compare: {compare!r} is not supported; use --compare base"])
        _quiet_libraries()
        from llamatune.evaluate.chat import chat

        chat(target, compare == "base", max_new_tokens, system, read=input, write=print)

    _run(body)


@app.command("runs")
def runs_command(
    args: Optional[List[str]] = typer.Argument(None, metavar="[DIR] | compare RUN RUN...", help="[DIR] (default: runs) to list, or compare RUN RUN [RUN...].",
                                               show_default=False),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print JSON instead of tables."),
) -> None:
    """List the runs in DIR (base, method, steps, held-out loss, eval, wall time, status), or `runs compare A B`:
    their recipe differences and results side by side."""

    def body() -> None:
        from llamatune.runs import command

        command(args or [], as_json, out)

    _run(body)
