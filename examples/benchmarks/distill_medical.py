"""The shipped distillation example, measured end to end: teacher (the medical SFT run), the builtin pruned to 20 of
30 layers, that student by SFT alone and by distillation with the same steps; held-out scores with paired
intervals, sizes, and generation speed in transformers and llama.cpp.

    python examples/benchmarks/distill_medical.py                 # runs/ in the repo; stages already there are reused
    python examples/benchmarks/distill_medical.py --runs DIR --keep-layers 18

Stages (each a plain llamatune command in a fresh process, timed):
  teacher   llamatune train recipes/medical/lora.yaml            (skipped when --runs already holds medical-sft)
  prune     llamatune prune smollm2-135m-instruct --keep-layers N --data recipes/medical/lora.yaml
  distill   llamatune train recipes/medical/distill.yaml          (teacher pass + student training)
  sft       the same recipe with distill.kd_ratio=0               (SFT alone: same student, data and steps)
  eval      distill vs SFT alone (paired), and vs the pruned start and the teacher
  speed     greedy generation of 64 tokens for 8 held-out prompts: teacher vs student, merged, fp32 in
            transformers; f16 GGUF in llama.cpp when llama-cpp-python is installed
Results go to results/distill-medical-<date>.json and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RECIPES = REPO / "recipes" / "medical"


def run(*argv, log: Path) -> float:
    """Runs `llamatune ARGV` in a fresh process; returns its wall seconds (fails loudly with the log's tail)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "llamatune", *map(str, argv)], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"llamatune {' '.join(map(str, argv))} failed:\n{log.read_text()[-3000:]}")
    return round(time.perf_counter() - t0, 1)


def speed_transformers(folder: Path, prompts: list[str], new_tokens: int = 64) -> float:
    """Generated tokens per second, greedy, batch 1, fp32 (the median of the prompts' rates)."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rates = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            t0 = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            rates.append((out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - t0))
    return round(statistics.median(rates), 1)


def speed_llamacpp(gguf: Path, prompts: list[str], new_tokens: int = 64) -> float | None:
    """The same in llama.cpp (f16 GGUF, 2 threads), or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import statistics

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=os.cpu_count(), verbose=False, seed=0)
    rates = []
    for prompt in prompts:
        t0 = time.perf_counter()
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=new_tokens, temperature=0.0)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
    return round(statistics.median(rates), 1)


def size_mib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs", help="folder for the runs (kept; reused)")
    parser.add_argument("--keep-layers", type=int, default=20)
    args = parser.parse_args()
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    logs = runs / "distill-logs"
    logs.mkdir(exist_ok=True)
    teacher, student = runs / "medical-sft", runs / "medical-student"
    distilled, sft = runs / "medical-distill", runs / "medical-student-sft"
    wall: dict[str, float] = {}
    if not (teacher / "summary.json").is_file():
        wall["teacher"] = run("train", RECIPES / "lora.yaml", "--run-dir", teacher, log=logs / "teacher.log")
    if not student.is_dir():
        wall["prune"] = run("prune", "smollm2-135m-instruct", "--keep-layers", args.keep_layers, "--data",
                            RECIPES / "lora.yaml", "--out", student, log=logs / "prune.log")
    paths = ["--set", f"model.path={student}", "--set", f"distill.teacher={teacher}"]
    if not (distilled / "summary.json").is_file():
        wall["distill"] = run("train", RECIPES / "distill.yaml", *paths, "--run-dir", distilled, log=logs / "distill.log")
    if not (sft / "summary.json").is_file():
        wall["sft"] = run("train", RECIPES / "distill.yaml", *paths, "--set", "distill.kd_ratio=0", "--run-dir", sft,
                          log=logs / "sft.log")
    reports = {}
    for name, compare in (("vs_sft", [str(sft)]), ("vs_start_teacher", ["base", "teacher"])):
        out = runs / f"distill-eval-{name}"
        flags = [a for c in compare for a in ("--compare", c)]
        wall[f"eval_{name}"] = run("eval", distilled, *flags, "--no-generate", "--out", out, log=logs / f"eval-{name}.log")
        reports[name] = json.loads((out / "eval.json").read_text())["metrics"]
    for r in (teacher, distilled):
        if not (r / "merged").is_dir():
            run("merge", r, log=logs / f"merge-{r.name}.log")
    held = [json.loads(line)["question"] for line in (REPO / "examples/medical/heldout.jsonl").read_text().splitlines()[:8]]
    speed = {"transformers_tok_s": {n: speed_transformers(r / "merged", held) for n, r in
                                    (("teacher", teacher), ("student", distilled))}}
    ggufs = {}
    for n, r in (("teacher", teacher), ("student", distilled)):
        ggufs[n] = runs / f"{r.name}-f16.gguf"
        if not ggufs[n].is_file():
            run("export", r / "merged", "--quant", "f16", "--out", ggufs[n], log=logs / f"export-{n}.log")
    speed["llamacpp_tok_s"] = {n: speed_llamacpp(g, held) for n, g in ggufs.items()}
    summaries = {n: json.loads((r / "summary.json").read_text()) for n, r in
                 (("teacher", teacher), ("distill", distilled), ("sft", sft))}
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "keep_layers": args.keep_layers,
              "wall_s": wall, "speed": speed,
              "size_mib": {"teacher": size_mib(teacher / "merged"), "student": size_mib(distilled / "merged")},
              "train": {n: {k: s.get(k) for k in ("steps", "train_wall_s", "peak_rss_gib", "eval_loss_before",
                                                  "eval_loss_after", "total_params")} for n, s in summaries.items()},
              "eval": reports}
    out = HERE / "results" / f"distill-medical-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("wall_s", "speed", "size_mib")}, indent=2))
    for name, metrics in reports.items():
        print(f"\n{name}:")
        for metric, v in metrics.items():
            print(f"  {metric}: {json.dumps(v)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
