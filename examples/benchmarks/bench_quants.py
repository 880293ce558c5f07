"""Throughput of llamatune's NumPy GGUF quantizers, and what it means for an 8B model.

    python examples/benchmarks/bench_quants.py                        # 4096x4096, 1 and 2 threads
    python examples/benchmarks/bench_quants.py --threads 2 --types q4_k

Quantizes one random float32 tensor of an 8B model's attention shape (4096x4096, weight-like scale 0.02)
with each type (after a small warm-up), best of --repeat runs, and prints millions of weights per second.
It then projects the time for a whole Llama-3-8B (the GGUF tensor list of a 32-layer, 4096-hidden,
14336-FFN, 128256-vocab model; 8.0e9 weights) for each file type: the type mix comes from
`quants.tensor_types` (llama.cpp's rules), and each tensor's time from the measured rate of its type. The projection assumes the rate holds
for every shape (the chunking makes the work per chunk the same) and excludes reading and writing files.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llamatune.artifacts import quants


def llama3_8b() -> list[tuple[str, tuple[int, int]]]:
    """GGUF names and (rows, cols) of Llama-3-8B's quantizable and norm tensors."""
    hidden, kv, ffn, vocab = 4096, 1024, 14336, 128256
    names = [("token_embd.weight", (vocab, hidden)), ("output.weight", (vocab, hidden)),
             ("output_norm.weight", (hidden,))]
    for i in range(32):
        names += [(f"blk.{i}.attn_q.weight", (hidden, hidden)), (f"blk.{i}.attn_k.weight", (kv, hidden)),
                  (f"blk.{i}.attn_v.weight", (kv, hidden)), (f"blk.{i}.attn_output.weight", (hidden, hidden)),
                  (f"blk.{i}.ffn_gate.weight", (ffn, hidden)), (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
                  (f"blk.{i}.ffn_down.weight", (hidden, ffn)), (f"blk.{i}.attn_norm.weight", (hidden,)),
                  (f"blk.{i}.ffn_norm.weight", (hidden,))]
    return names


def measure(x: np.ndarray, qtype: str, threads: int, repeat: int) -> float:
    """Best rate over `repeat` runs, in weights per second."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        quants.quantize(x, qtype, threads=threads)
        best = min(best, time.perf_counter() - start)
    return x.size / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--types", default="q4_0,q8_0,q4_k,q5_k,q6_k")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to measure")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    x = (np.random.default_rng(0).standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    kinds = [t.upper() for t in args.types.split(",")]
    for kind in kinds:  # warm-up: imports, first-touch page faults, caches
        quants.quantize(x[:64], kind, threads=1)
    layout = llama3_8b()
    shapes = dict(layout)
    total = sum(int(np.prod(s)) for s in shapes.values())
    for threads in [int(t) for t in args.threads.split(",")]:
        rates = {kind: measure(x, kind, threads, args.repeat) for kind in kinds}
        print(f"threads={threads}  tensor {args.rows}x{args.cols}")
        for kind, rate in rates.items():
            print(f"  {kind:5s} {rate / 1e6:7.2f} M weights/s   8.0e9 weights all {kind}: {8.0e9 / rate / 60:6.1f} min")
        for ftype in ("q4_0", "q8_0", "q4_k_m", "q5_k_m", "q6_k"):
            mix = quants.tensor_types(layout, ftype, 32, tied=False)
            needed = {t for t in mix.values() if t not in ("F32", "F16")}
            if not needed <= set(rates):
                continue
            seconds = sum(np.prod(shapes[n]) / rates[t] for n, t in mix.items() if t in rates)
            print(f"  Llama-3-8B {ftype:7s} ({total / 1e9:.2f}e9 weights): {seconds / 60:6.1f} min projected")


if __name__ == "__main__":
    main()
