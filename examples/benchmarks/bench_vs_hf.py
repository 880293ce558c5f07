"""llamatune vs a plain transformers.Trainer + peft LoRA run: same model, data, LoRA settings, effective
batch and optimizer steps, alternating in one invocation, each run in its own fresh process.

    python examples/benchmarks/bench_vs_hf.py                       # MedQuAD from ../shared/datasets
    python examples/benchmarks/bench_vs_hf.py --data project        # the project's own Q&A (no shared data)

A third side, llamatune with `train.gradient_checkpointing: true`, shows the memory-saving mode (skip it
with --sides hf,llamatune).

Reports per side: real (non-padding) tokens/s, peak RSS (and peak GPU memory on a GPU), held-out loss
after the same tokens, achieved model FLOP/s against a matmul roof measured here, and the ratios. The
JSON goes to examples/benchmarks/results/. FLOP convention: 4·N per real token (forward 2N, backward to
the inputs 2N; the frozen base gets no weight gradient), N = parameters inside matmuls including the
output head; attention-score FLOPs and the LoRA matmuls are not counted.

The baseline is what a user writes from the transformers/peft docs: AutoModelForCausalLM in fp32,
LoraConfig(r=16, alpha=32, dropout=0.05, all-linear), Trainer with per-device batch 4, padding to the
longest sequence of each batch (DataCollatorForSeq2Seq), answer-only labels via the chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
MICRO_BATCH, LR, WARMUP, SEED = 4, 1e-3, 0.1, 0
SIDES = ("hf", "llamatune", "llamatune_checkpointing")


# ---- data: the same JSONL for both sides -------------------------------------------------------------
def write_data(kind: str, n_train: int, n_eval: int, folder: Path, tokenizer) -> dict:
    """Picks Q&A pairs whose chat-formatted length is 64-511 tokens; writes train.jsonl / heldout.jsonl."""
    if kind == "medquad":
        import xml.etree.ElementTree as ET

        root = REPO.parent / "shared" / "datasets" / "medical" / "medquad" / "6_NINDS_QA"
        if not root.is_dir():
            sys.exit(f"{root} not found: run with --data project, or put the shared datasets beside the repository")
        docs = []
        for path in sorted(root.glob("*.xml")):
            pairs = [(p.findtext("Question"), p.findtext("Answer")) for p in ET.parse(path).getroot().iter("QAPair")]
            docs.append([(q.strip(), a.strip()) for q, a in pairs if q and a])
    else:
        docs = [[(r["question"], r["answer"])] for name in ("medical/train.jsonl", "legal/qa_train.jsonl")
                for r in map(json.loads, (REPO / "examples" / name).read_text().splitlines())]
    random.Random(SEED).shuffle(docs)
    cut = max(1, len(docs) // 5)  # held-out pairs come from other documents than the training pairs
    def pick(groups, n):
        out = []
        for q, a in (pair for g in groups for pair in g):
            length = len(tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                                       tokenize=True, return_dict=False))
            if 64 <= length <= 511:
                out.append({"question": q, "answer": a, "tokens": length})
            if len(out) == n:
                break
        return out
    train, held = pick(docs[cut:], n_train), pick(docs[:cut], n_eval)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        (folder / name).write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    lengths = [r["tokens"] for r in train]
    return {"data": kind, "train_examples": len(train), "heldout_examples": len(held), "min_tokens": min(lengths),
            "max_tokens": max(lengths), "mean_tokens": round(statistics.mean(lengths), 1)}


def encode_plain(tokenizer, question: str, answer: str) -> dict:
    """The plain-HF way: chat template, labels only on the assistant's answer."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                         tokenize=True, return_dict=False)
    return {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}


def heldout_loss(model, tokenizer, rows: list[dict]) -> float:
    """Token-weighted answer cross-entropy in fp32, one example at a time (identical for both sides)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            e = encode_plain(tokenizer, row["question"], row["answer"])
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float()
            labels = torch.tensor(e["labels"][1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


# ---- the two workers (each in its own process) -------------------------------------------------------
def worker_hf(folder: Path, model_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    encoded = [encode_plain(tokenizer, r["question"], r["answer"]) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(folder / "hf-out"), per_device_train_batch_size=MICRO_BATCH,
                             gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=LR,
                             warmup_steps=round(WARMUP * -(-len(encoded) // MICRO_BATCH)),  # llamatune's rounding
                             lr_scheduler_type="cosine", logging_steps=1000, save_strategy="no", report_to=[],
                             seed=SEED, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(encoded),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    real = sum(len(e["input_ids"]) for e in encoded)
    return {"train_s": seconds, "real_tokens": real, "steps": out.global_step,
            "heldout_loss": heldout_loss(model, tokenizer, held), **_peaks()}


def worker_llamatune(folder: Path, model_dir: str, checkpointing: bool = False) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    recipe = folder / "bench.yaml"
    source = '    prompt: "{question}"\n    response: "{answer}"\n'
    recipe.write_text(f"model:\n  path: {model_dir}\nlora:\n  r: {LORA['r']}\n  alpha: {LORA['alpha']}\n  dropout: {LORA['dropout']}\n"
                      f"data:\n  train:\n    path: train.jsonl\n{source}  eval:\n    path: heldout.jsonl\n{source}"
                      f"  max_length: 512\n  packing: false\n  dedup: false\n"
                      f"train:\n  seed: {SEED}\n  epochs: 1\n  micro_batch_size: {MICRO_BATCH}\n  grad_accum: 1\n  lr: {LR}\n"
                      f"  warmup_ratio: {WARMUP}\n  scheduler: cosine\n  log_every: 1000\n"
                      f"  gradient_checkpointing: {str(checkpointing).lower()}\n")
    t0 = time.perf_counter()
    result = train(load_recipe(recipe), "bench", run_dir=folder / "lt-run", evaluate_held_out=False)
    # The whole call minus model loading: data building, run directory, adapter and plot writing included
    # (conservative: trainer.train() covers HF's loop only).
    seconds = time.perf_counter() - t0 - result.summary["model_load_s"]
    peaks = _peaks()  # before the fp32 reload below, which is evaluation, not training
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder / "lt-run" / "adapter")
    held = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    return {"train_s": seconds, "real_tokens": result.summary["tokens"], "steps": result.summary["steps"],
            "precision": result.summary["precision"], "heldout_loss": heldout_loss(model, tokenizer, held), **peaks}


def with_side_arguments(parser: argparse.ArgumentParser, sides: tuple[str, ...]) -> argparse.ArgumentParser:
    """The arguments every side-by-side benchmark takes: repeats, model, output folder, sides, and the hidden
    --worker / --folder its own worker processes are started with."""
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; medians are reported")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="builtin alias or local model folder")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--sides", default=",".join(sides), help=f"comma-separated, from {', '.join(sides)}")
    parser.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    return parser


def run_worker(script: str, side: str, folder: Path, model_dir: str, llamatune: bool) -> dict:
    """Runs `script --worker SIDE` in a fresh process and returns the dict it printed as `RESULT {...}`. A llamatune
    side starts the way the `llamatune` program starts a training run (under tcmalloc when installed, memory.py);
    the others on the system allocator, as their users run them."""
    from llamatune.memory import preload_environment

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if llamatune:
        env = preload_environment(["train"], env) or env
    done = subprocess.run([sys.executable, script, "--worker", side, "--folder", str(folder), "--model", model_dir],
                          capture_output=True, text=True, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode or line is None:
        sys.exit(f"{side} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def _peaks() -> dict:
    import torch

    from llamatune.memory import active_allocator

    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "allocator": active_allocator()}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- the roof and the FLOP count ----------------------------------------------------------------------
def matmul_roof() -> dict:
    """Best GFLOP/s of a 2048^3 matmul in fp32 and bf16 on this device (a few seconds)."""
    import torch

    from llamatune.model import training_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    # Emulated bf16 (a CPU without AVX512-BF16/AMX) runs ~50x below fp32: minutes for no roof anyone trains on.
    native_bf16 = training_precision("auto") == "bf16"
    for dtype in (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,):
        a = torch.randn(2048, 2048, device=device, dtype=dtype)
        b = torch.randn(2048, 2048, device=device, dtype=dtype)
        best = 0.0
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 3 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
        out[str(dtype).removeprefix("torch.")] = round(best, 1)
    return out


def matmul_params(model_dir: str) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, L, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    q = c.num_attention_heads * (getattr(c, "head_dim", None) or h // c.num_attention_heads)
    kv = c.num_key_value_heads * (getattr(c, "head_dim", None) or h // c.num_attention_heads)
    return L * (h * q + 2 * h * kv + q * h + 3 * h * i) + v * h


# ---- the driver ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["medquad", "project"], default="medquad")
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--heldout-examples", type=int, default=24)
    args = with_side_arguments(parser, SIDES).parse_args()
    if args.worker:
        if args.worker == "hf":
            result = worker_hf(args.folder, args.model)
        else:
            result = worker_llamatune(args.folder, args.model, checkpointing=args.worker == "llamatune_checkpointing")
        print("RESULT " + json.dumps(result))
        return
    sides = args.sides.split(",")
    if "hf" not in sides or any(side not in SIDES for side in sides):
        parser.error(f"--sides: hf and any of {', '.join(SIDES[1:])}, comma-separated")

    from transformers import AutoTokenizer

    from llamatune.model import resolve
    from llamatune.schema import ModelSpec

    model_dir = resolve(ModelSpec(path=args.model), print)
    with tempfile.TemporaryDirectory(prefix="llamatune-vs-hf-") as tmp:
        folder = Path(tmp)
        data = write_data(args.data, args.train_examples, args.heldout_examples, folder, AutoTokenizer.from_pretrained(model_dir))
        print(f"data: {data}", flush=True)
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(args.repeats):
            for side in sides:
                run_dir = folder / f"{side}-{r}"
                run_dir.mkdir()
                for name in ("train.jsonl", "heldout.jsonl"):
                    (run_dir / name).write_text((folder / name).read_text())
                # Each side runs as its users run it: HF on the system allocator, llamatune the way the
                # `llamatune` program starts a training run (under tcmalloc when installed, memory.py).
                result = run_worker(__file__, side, run_dir, model_dir, llamatune=side != "hf")
                result["tokens_per_s"] = result["real_tokens"] / result["train_s"]
                runs[side].append(result)
                print(f"{side} #{r + 1}: {result['tokens_per_s']:.1f} real tok/s, peak RSS {result['peak_rss_gib']:.2f} GiB, "
                      f"held-out loss {result['heldout_loss']:.4f}, {result['steps']} steps", flush=True)
    roof = matmul_roof()
    n = matmul_params(model_dir)
    summary = {}
    for side, results in runs.items():
        tps = statistics.median(r["tokens_per_s"] for r in results)
        dtype = "bfloat16" if results[0].get("precision") == "bf16" else "float32"
        summary[side] = {"tokens_per_s": round(tps, 1), "peak_rss_gib": round(statistics.median(r["peak_rss_gib"] for r in results), 2),
                         "heldout_loss": round(statistics.median(r["heldout_loss"] for r in results), 4),
                         "steps": results[0]["steps"], "allocator": results[0]["allocator"], "model_gflops": round(4 * n * tps / 1e9, 1),
                         "roof_dtype": dtype, "share_of_roof": round(4 * n * tps / 1e9 / roof[dtype], 3)}
        if "peak_gpu_gib" in results[0]:
            summary[side]["peak_gpu_gib"] = round(statistics.median(r["peak_gpu_gib"] for r in results), 2)
    hf = summary["hf"]
    ratios = {side: {"tokens_per_s": round(lt["tokens_per_s"] / hf["tokens_per_s"], 2),
                     "peak_rss": round(lt["peak_rss_gib"] / hf["peak_rss_gib"], 2),
                     "heldout_loss": round(lt["heldout_loss"] / hf["heldout_loss"], 4)}
              for side, lt in summary.items() if side != "hf"}
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(), "model": args.model,
              "matmul_params": n, "roof_gflops": roof, "data": data, "lora": LORA, "micro_batch": MICRO_BATCH, "lr": LR,
              "repeats": args.repeats, "runs": runs, "summary": summary, "ratios_over_hf": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{'gpu' if 'peak_gpu_gib' in hf else 'cpu'}-{args.data}-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nroof: {roof} GFLOP/s; N = {n:,} matmul params; {data}")
    print("| | real tokens/s | peak RSS GiB | held-out loss | model GFLOP/s (share of roof) |\n|---|---|---|---|---|")
    for side in sides:
        s = summary[side]
        print(f"| {side} | {s['tokens_per_s']} | {s['peak_rss_gib']} | {s['heldout_loss']} | "
              f"{s['model_gflops']} ({s['share_of_roof']:.0%} of {s['roof_dtype']}) |")
    for side, ratio in ratios.items():
        print(f"| {side} / hf | {ratio['tokens_per_s']}x | {ratio['peak_rss']}x | {ratio['heldout_loss']}x | |")
    print(f"wrote {path}")


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
