"""llamatune DPO vs TRL's DPOTrainer: same model, pairs, LoRA, batch and optimizer steps, alternating in one
invocation, each run in its own fresh process; and llamatune SFT on the same pairs' chosen answers, for the memory
ratio DPO / SFT.

    python examples/benchmarks/bench_dpo_vs_trl.py                     # 64 medical pairs, 2 repeats
    python examples/benchmarks/bench_dpo_vs_trl.py --pairs 128 --sides trl,llamatune

Sides:
- trl: `DPOTrainer(model, peft_config=LoraConfig(...))` as TRL's documentation shows it for LoRA: the reference is
  the same model with the adapter disabled, one extra no-grad forward of both answers every step.
- trl_precompute: the same with `precompute_ref_log_probs=True` (TRL's reference pass once, before training).
- llamatune: `train.method: dpo`, reference: base, its log-probs computed once before step 1; each pair one
  tree row (the prompt once, both answers after it).
- llamatune_sft: `train.method: sft` on prompt -> chosen answer (for the peak-RSS ratio, not for speed).

Timing: from the model being loaded to the last step, data preparation included on both sides (TRL: the
DPOTrainer constructor, which tokenizes and, with precompute, runs its reference pass, then trainer.train();
llamatune: the train() call minus its model load). Throughput is pair tokens per second, counted the same way for
both: the chat-formatted prompt + chosen and prompt + rejected, i.e. the two sequences TRL feeds the model (the
tree row gives llamatune fewer tokens to process: that saving is what is being measured). Peak RSS is the process's
ru_maxrss. The JSON goes to examples/benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from bench_vs_hf import _machine, _peaks, run_worker, with_side_arguments  # noqa: E402  (the same peak and machine readings as the SFT benchmark)

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
MICRO_BATCH, LR, BETA, WARMUP, SEED = 4, 2e-4, 0.1, 0.1, 0
SIDES = ("trl", "trl_precompute", "llamatune", "llamatune_sft")


def pair_tokens(tokenizer, rows: list[dict]) -> int:
    """Chat-formatted prompt + chosen plus prompt + rejected, summed over the pairs."""
    total = 0
    for r in rows:
        user = [{"role": "user", "content": r["question"]}]
        for answer in (r["chosen"], r["rejected"]):
            total += len(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True,
                                                       return_dict=False))
    return total


def worker_trl(folder: Path, model_dir: str, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(folder / "trl-out"), per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=1,
                     num_train_epochs=1, learning_rate=LR, beta=BETA, loss_type=["sigmoid"],
                     warmup_steps=round(WARMUP * -(-len(rows) // MICRO_BATCH)), lr_scheduler_type="cosine",
                     logging_steps=1000, save_strategy="no", report_to=[], seed=SEED, dataloader_num_workers=0,
                     max_length=None, bf16=False, use_cpu=not torch.cuda.is_available(),
                     precompute_ref_log_probs=precompute)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    out = trainer.train()
    seconds = time.perf_counter() - t0
    return {"train_s": seconds, "pair_tokens": pair_tokens(tokenizer, rows), "steps": out.global_step,
            "train_loss": out.training_loss, **_peaks()}


def worker_llamatune(folder: Path, model_dir: str, method: str) -> dict:
    from transformers import AutoTokenizer

    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    if method == "dpo":
        source = ('    format: preference\n    prompt: "{question}"\n    chosen: "{chosen}"\n    rejected: "{rejected}"\n')
        tail = f"preference:\n  loss: sigmoid\n  beta: {BETA}\n  reference: base\n"
    else:
        source, tail = '    prompt: "{question}"\n    response: "{chosen}"\n', ""
    recipe = folder / f"{method}.yaml"
    recipe.write_text(f"model:\n  path: {model_dir}\nlora:\n  r: {LORA['r']}\n  alpha: {LORA['alpha']}\n  dropout: {LORA['dropout']}\n"
                      f"  target_modules: all-linear\n"
                      f"data:\n  train:\n    path: pairs.jsonl\n{source}  eval:\n    path: heldout.jsonl\n{source}"
                      f"  max_length: 1024\n  packing: false\n  dedup: false\n"
                      f"train:\n  method: {method}\n  seed: {SEED}\n  epochs: 1\n  micro_batch_size: {MICRO_BATCH}\n"
                      f"  grad_accum: 1\n  lr: {LR}\n  warmup_ratio: {WARMUP}\n  scheduler: cosine\n  log_every: 1000\n"
                      f"  precision: fp32\n{tail}")
    t0 = time.perf_counter()
    result = train(load_recipe(recipe), "bench", run_dir=folder / f"lt-{method}", evaluate_held_out=False)
    seconds = time.perf_counter() - t0 - result.summary["model_load_s"]
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    return {"train_s": seconds, "pair_tokens": pair_tokens(AutoTokenizer.from_pretrained(model_dir), rows),
            "steps": result.summary["steps"], **_peaks()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="training pairs (from examples/medical/preference_train.jsonl)")
    args = with_side_arguments(parser, SIDES).parse_args()
    if args.worker:
        if args.worker.startswith("trl"):
            result = worker_trl(args.folder, args.model, precompute=args.worker == "trl_precompute")
        else:
            result = worker_llamatune(args.folder, args.model, "sft" if args.worker == "llamatune_sft" else "dpo")
        print("RESULT " + json.dumps(result))
        return
    sides = args.sides.split(",")
    if any(side not in SIDES for side in sides) or "trl" not in sides or "llamatune" not in sides:
        parser.error(f"--sides: trl, llamatune and any of {', '.join(SIDES)}, comma-separated")

    from llamatune.model import resolve
    from llamatune.schema import ModelSpec

    model_dir = resolve(ModelSpec(path=args.model), print)
    lines = (REPO / "examples" / "medical" / "preference_train.jsonl").read_text().splitlines()
    held = (REPO / "examples" / "medical" / "preference_heldout.jsonl").read_text().splitlines()[:4]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="llamatune-dpo-vs-trl-") as tmp:
        for r in range(args.repeats):
            for side in sides:
                folder = Path(tmp) / f"{side}-{r}"
                folder.mkdir()
                (folder / "pairs.jsonl").write_text("\n".join(lines[: args.pairs]) + "\n")
                (folder / "heldout.jsonl").write_text("\n".join(held) + "\n")
                result = run_worker(__file__, side, folder, model_dir, llamatune=side.startswith("llamatune"))
                result["pair_tokens_per_s"] = result["pair_tokens"] / result["train_s"]
                runs[side].append(result)
                print(f"{side} #{r + 1}: {result['pair_tokens_per_s']:.1f} pair tok/s, {result['train_s']:.1f} s, "
                      f"peak RSS {result['peak_rss_gib']:.2f} GiB, {result['steps']} steps", flush=True)
    median = lambda side, key: statistics.median(r[key] for r in runs[side])  # noqa: E731
    summary = {side: {"pair_tokens_per_s": round(median(side, "pair_tokens_per_s"), 1), "train_s": round(median(side, "train_s"), 1),
                      "peak_rss_gib": round(median(side, "peak_rss_gib"), 2), "steps": runs[side][0]["steps"],
                      "allocator": runs[side][0]["allocator"]} for side in sides}
    ratios = {f"llamatune / {side}": round(summary["llamatune"]["pair_tokens_per_s"] / summary[side]["pair_tokens_per_s"], 2)
              for side in sides if side.startswith("trl")}
    if "llamatune_sft" in summary:
        ratios["peak RSS llamatune dpo / sft"] = round(summary["llamatune"]["peak_rss_gib"] / summary["llamatune_sft"]["peak_rss_gib"], 2)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(), "model": args.model,
              "pairs": args.pairs, "lora": LORA, "micro_batch": MICRO_BATCH, "lr": LR, "beta": BETA, "repeats": args.repeats,
              "runs": runs, "summary": summary, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"dpo-vs-trl-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print("| side | pair tokens/s | seconds | peak RSS GiB | steps |\n|---|---|---|---|---|")
    for side in sides:
        s = summary[side]
        print(f"| {side} | {s['pair_tokens_per_s']} | {s['train_s']} | {s['peak_rss_gib']} | {s['steps']} |")
    for name, value in ratios.items():
        print(f"{name}: {value}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
