"""Every `llamatune export --quant` type of one run, measured in llama.cpp, next to llama.cpp's own quantizer.

    python examples/benchmarks/bench_export.py                 # trains the quickstart first (~3 min on 2 cores)
    python examples/benchmarks/bench_export.py --run runs/X    # an existing run (merged once if needed)

For each type: file size, bits per weight, and against the merged model along the run's held-out answers
(teacher-forced, up to 8 examples): top-1 agreement, mean KL, perplexity of the reference answers (all from
the export's own export_report.json), plus llama.cpp's generation speed (greedy, 64 new tokens after a chat
prompt, best of 3, this machine's threads). llama.cpp's own Q4_K_M, Q5_K_M, Q5_1 and Q4_0, quantized from llamatune's f16
file by `llama_model_quantize`, are measured the same way. Needs llama-cpp-python. Writes
results/export-<date>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROMPT = [{"role": "user", "content": "What are the common symptoms of iron deficiency anaemia?"}]


def _llamatune(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "llamatune", *argv], check=True, cwd=REPO)


def _tokens_per_second(path: Path) -> float:
    from llamatune.artifacts import llamacpp

    llm = llamacpp.open_model(path, n_ctx=512)
    best = 0.0
    try:
        for _ in range(3):
            llm.reset()
            start = time.perf_counter()
            out = llm.create_chat_completion(messages=PROMPT, max_tokens=64, temperature=0.0)
            took = time.perf_counter() - start
            best = max(best, out["usage"]["completion_tokens"] / took)
    finally:
        llm.close()
    return best


def _llama_cpp_quantize(f16: Path, out: Path, ftype: str) -> None:
    import llama_cpp

    from llamatune.artifacts import llamacpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 2
    with llamacpp._quiet():
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize {f16} to {ftype}")


def main() -> None:
    from llamatune.artifacts.export import QUANTS, _open_model
    from llamatune.artifacts.export_report import file_facts, quality

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a run directory (default: train recipes/quickstart.yaml)")
    parser.add_argument("--quants", default=",".join(QUANTS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    run = args.run
    if run is None:
        run = work / "quickstart"
        _llamatune("train", "recipes/quickstart.yaml", "--run-dir", str(run))
    if not (run / "merged").is_dir():
        _llamatune("merge", str(run))
    merged = run / "merged"
    rows = []
    for quant in args.quants.split(","):
        out = work / f"{quant}.gguf"
        started = time.perf_counter()
        _llamatune("export", str(merged), "--quant", quant, "--out", str(out))
        report = json.loads(out.with_name(out.stem + ".export_report.json").read_text())
        rows.append({"file": f"llamatune {quant}", "export_s": round(time.perf_counter() - started, 1),
                     **report["file"], **report["quality"], "tokens_per_s": _tokens_per_second(out)})
    f16 = work / "f16.gguf"
    if not f16.exists():
        _llamatune("export", str(merged), "--quant", "f16", "--out", str(f16))
    _, model, tokenizer = _open_model(merged)
    for ftype in ("Q4_K_M", "Q5_K_M", "Q5_1", "Q4_0"):
        out = work / f"llama.cpp-{ftype}.gguf"
        _llama_cpp_quantize(f16, out, ftype)
        rows.append({"file": f"llama.cpp {ftype} (from llamatune f16)", **file_facts(out),
                     **quality(out, model, tokenizer, merged, print), "tokens_per_s": _tokens_per_second(out)})
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    (HERE / "results").mkdir(exist_ok=True)
    result = {"run": str(run), "machine": os.uname().machine, "cpus": os.cpu_count(), "rows": rows}
    (HERE / "results" / f"export-{stamp}.json").write_text(json.dumps(result, indent=2))
    print("| file | MiB | bits/weight | top-1 vs merged | mean KL | perplexity (merged) | llama.cpp tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['size_mib']:.1f} | {r['bits_per_weight']:.2f} | {r['top1_agreement']:.1%} "
              f"({r['positions']} tokens) | {r['mean_kl']:.4f} | {r['perplexity_gguf']:.3f} ({r['perplexity_merged']:.3f}) "
              f"| {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
