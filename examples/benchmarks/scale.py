"""The scale ladder: Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B shapes with random weights, through every stage
outside and inside training, each stage in a fresh process with its wall time, peak RSS and disk.

    python examples/benchmarks/scale.py                  # 1b, 3b, 3b-qlora, 8b (about 1.5 h on 2 cores; ~45 GB of disk)
    python examples/benchmarks/scale.py --shapes 1b      # one rung
    python examples/benchmarks/scale.py --work /big/disk # where the models go (default: a temporary folder)

For each shape:
  build    random bf16 weights written shard by shard (tensors.SafetensorsWriter), the builtin model's tokenizer
  export   llamatune export MODEL --quant q8_0                  (the GGUF a user would bring)
  convert  the GGUF back to safetensors, as `model.path: X.gguf` does (model.dtype auto: float16)
  plan     llamatune plan's peak prediction for the recipe below (this machine)
  bench    llamatune bench --steps 2: tokens/s, step time and the peak, next to the plan: LoRA for 1b and 3b,
           QLoRA nf4 for 3b-qlora and 8b (float32 compute on a CPU without bf16)
  train    llamatune train, the same 2 steps, for the adapter merge needs (its peak is a second reading)
  merge    llamatune merge RUN (bf16 output), parity layer by layer
  export4  llamatune export RUN/merged --quant q4_k_m
Peak RSS is the child's own (wait4's ru_maxrss; each stage starts in a small process). Results go to
results/scale-<date>.json and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GiB = 2**30

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5)
SHAPES = {  # the published configs' shapes (rope scaling left out: it changes no tensor)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, **_LLAMA3),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, **_LLAMA3),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, **_LLAMA3),
}
RUNGS = {"1b": ("1b", "none"), "3b": ("3b", "none"), "3b-qlora": ("3b", "nf4"), "8b": ("8b", "nf4")}


def build(shape: str, folder: Path) -> None:
    """A random Llama of `shape` in bf16, one tensor at a time (the process never holds more than one)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llamatune.artifacts.tensors import CHUNK_ELEMENTS, SafetensorsWriter
    from llamatune.catalog import ensure_builtin

    tokenizer = AutoTokenizer.from_pretrained(ensure_builtin("smollm2-135m-instruct"))
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype=torch.bfloat16, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight")
    folder.mkdir(parents=True)
    writer = SafetensorsWriter(folder, [(n, torch.bfloat16, s) for n, s in names.items()])
    generator = torch.Generator().manual_seed(0)
    for name, shape_ in names.items():
        if len(shape_) == 1:
            writer.write(name, torch.ones(shape_, dtype=torch.bfloat16))
            continue
        step = max(1, CHUNK_ELEMENTS // shape_[1])
        writer.write_chunks(name, (torch.randn((min(step, shape_[0] - i), shape_[1]), generator=generator)
                                   .mul_(0.02).to(torch.bfloat16) for i in range(0, shape_[0], step)))
    writer.close()
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def recipe(work: Path, gguf: Path, quant: str) -> Path:
    """A recipe on the converted GGUF: 16 short original Q&A pairs, rows of at most 128 tokens, one per step."""
    rows = [{"question": f"In the ladder's record {i}, which stage follows conversion?",
             "answer": f"Record {i}: planning follows conversion, then two training steps, merge and export."}
            for i in range(20)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    source = "    prompt: '{question}'\n    response: '{answer}'\n"
    path = work / f"recipe-{quant}.yaml"
    path.write_text(
        f"model:\n  path: {gguf}\nquantization:\n  mode: {quant}\nlora:\n  r: 8\n  target_modules: [q_proj, v_proj]\n"
        f"data:\n  max_length: 128\n  packing: false\n  train:\n    path: train.jsonl\n{source}"
        f"  eval:\n    path: eval.jsonl\n{source}"
        "train:\n  epochs: null\n  max_steps: 2\n  micro_batch_size: 1\n  grad_accum: 1\n  log_every: 1\n"
        "  save_every: null\n  eval_before: false\n")
    return path


def _measure(argv: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Wall seconds and peak RSS (GiB) of one command in a fresh process."""
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own peak, which Popen.wait does not give
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{tail}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def _llamatune(*argv) -> list[str]:
    return [sys.executable, "-m", "llamatune", *map(str, argv)]


def _disk(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / GiB, 2)


_PLAN = """
import json, sys
from pathlib import Path
from transformers import AutoConfig
from llamatune.preflight import check
from llamatune.recipe import load_recipe
from llamatune.train import plan as planning
runtime = planning.runtime_resident_bytes()
recipe = load_recipe(Path(sys.argv[1]))
checked = check(recipe, sys.argv[1], say=lambda _: None)
found = planning.estimate(recipe, AutoConfig.from_pretrained(checked.ref), planning.this_machine(),
                          checked.data.manifest["totals"]["longest_row"], runtime)
print("PLAN", json.dumps({"total_gib": found.total / 2**30, "parts_gib": {k: v / 2**30 for k, v in found.parts.items()}}))
"""

_CONVERT = """
import sys
from pathlib import Path
from llamatune.catalog import ensure_gguf
print("FOLDER", ensure_gguf(Path(sys.argv[1]), say=lambda m: print(m, flush=True)))
"""


def rung(name: str, work: Path) -> dict:
    shape, quant = RUNGS[name]
    work.mkdir(parents=True, exist_ok=True)
    env = {"LLAMATUNE_CACHE_DIR": str(work / "cache")}
    steps: dict[str, dict] = {}
    model = work / f"model-{shape}"
    gguf = work / f"model-{shape}-q8_0.gguf"
    if not gguf.exists():  # (kept from an earlier invocation with the same --work: the build is random anyway)
        steps["build"] = {**_measure([sys.executable, __file__, "--build", shape, "--out", str(model)], env,
                                     work / "build.log"), "disk_gib": _disk(model)}
        steps["export"] = {**_measure(_llamatune("export", model, "--quant", "q8_0", "--out", gguf), env, work / "export.log"),
                           "disk_gib": _disk(gguf)}
        shutil.rmtree(model)  # the ladder goes on from the GGUF a user brings; the random folder is not needed
    shutil.rmtree(work / "cache" / "gguf", ignore_errors=True)  # converted afresh, so that it is measured
    steps["convert"] = _measure([sys.executable, "-c", _CONVERT, str(gguf)], env, work / "convert.log")
    steps["convert"]["disk_gib"] = _disk(work / "cache" / "gguf")
    path = recipe(work, gguf, quant)
    planned = subprocess.run([sys.executable, "-c", _PLAN, str(path)], cwd=work, env={**os.environ, **env},
                             capture_output=True, text=True)
    if planned.returncode != 0:
        raise SystemExit(planned.stderr[-3000:])
    steps["plan"] = json.loads(planned.stdout.rsplit("PLAN", 1)[1])
    numbers = work / "bench.json"
    numbers.unlink(missing_ok=True)
    steps["bench"] = _measure(_llamatune("bench", path, "--steps", 2, "--save", numbers), env, work / "bench.log")
    bench = json.loads(numbers.read_text())
    steps["bench"].update({k: bench[k] for k in ("tokens_per_s", "step_s", "plan_estimate_gib", "precision")})
    steps["bench"]["plan_error"] = round(steps["plan"]["total_gib"] / steps["bench"]["peak_rss_gib"] - 1, 3)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    steps["train"] = _measure(_llamatune("train", path, "--run-dir", run), env, work / "train.log")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_times = [m["elapsed_s"] for m in metrics if "tokens_per_s" in m]
    steps["train"]["step_s"] = [round(b - a, 1) for a, b in zip([0.0] + step_times, step_times)]
    steps["train"]["plan_error"] = round(steps["plan"]["total_gib"] / steps["train"]["peak_rss_gib"] - 1, 3)
    steps["merge"] = {**_measure(_llamatune("merge", run, "--dtype", "bf16"), env, work / "merge.log"),
                      "disk_gib": _disk(run / "merged")}
    steps["merge"]["report"] = json.loads((run / "merged" / "merge_report.json").read_text())["merged_vs_unmerged"]
    out = work / f"tuned-{shape}-q4_k_m.gguf"
    for old in (out, out.with_name(out.stem + ".export_report.json")):
        old.unlink(missing_ok=True)
    steps["export4"] = {**_measure(_llamatune("export", run / "merged", "--quant", "q4_k_m", "--out", out), env,
                                   work / "export4.log"), "disk_gib": _disk(out)}
    quality = json.loads(out.with_name(out.stem + ".export_report.json").read_text())["quality"]
    steps["export4"]["quality"] = {k: quality[k] for k in ("measured_in", "top1_agreement", "mean_kl")}
    return {"shape": shape, "quant": quant, "parameters": _parameters(shape), "steps": steps}


def _parameters(shape: str) -> int:
    s = SHAPES[shape]
    h, i, n, heads, kv, d, v = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                                s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"], s["vocab_size"])
    layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i + 2 * h
    return n * layer + v * h * (1 if s["tie_word_embeddings"] else 2) + h


def table(results: list[dict]) -> str:
    lines = ["| rung | params | step | wall | peak RSS | disk | notes |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for step, m in r["steps"].items():
            if step == "plan":
                continue
            note = ""
            if step == "bench":
                note = (f"plan {r['steps']['plan']['total_gib']:.2f} GiB ({m['plan_error']:+.0%}); "
                        f"{m['tokens_per_s']:.0f} tokens/s, {m['step_s']:.1f} s/step ({m['precision']})")
            elif step == "train":
                note = (f"plan {r['steps']['plan']['total_gib']:.2f} GiB ({m['plan_error']:+.0%}); "
                        f"steps {', '.join(f'{s:.0f}' for s in m['step_s'])} s")
            elif step == "merge":
                note = f"max Δlogit {m['report']['max_abs_logit']:.3g}, KL {m['report'].get('mean_kl', 0):.2g}"
            elif step == "export4":
                q = m["quality"]
                note = f"top-1 {q['top1_agreement']:.1%}, KL {q['mean_kl']:.3f} ({q['measured_in'][:30]})"
            rung_name = f"{r['shape']}" + (" QLoRA" if r["quant"] == "nf4" else " LoRA")
            lines.append(f"| {rung_name} | {r['parameters'] / 1e9:.2f}B | {step} | {m.get('wall_s', 0):.0f} s | "
                         f"{m.get('peak_rss_gib', 0):.2f} GiB | {m.get('disk_gib', '')} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,3b,3b-qlora,8b", help=f"comma-separated rungs of {', '.join(RUNGS)}")
    parser.add_argument("--work", type=Path, default=None, help="folder for models and runs (kept when given)")
    parser.add_argument("--build", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build(args.build, args.out)
    work = args.work or Path(tempfile.mkdtemp(prefix="llamatune-scale-"))
    results = []
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    for name in args.shapes.split(","):
        print(f"== {name} in {work / name}", flush=True)
        results.append({"rung": name, **rung(name, work / name)})
        out = HERE / "results" / f"scale-{stamp}.json"
        out.write_text(json.dumps({"machine": _machine(), "results": results}, indent=2) + "\n")
        print(table(results), flush=True)
        if args.work is None:
            shutil.rmtree(work / name, ignore_errors=True)


def _machine() -> dict:
    import platform

    return {"cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version()}


if __name__ == "__main__":
    main()
