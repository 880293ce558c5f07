"""What every export measures before its file is renamed into place: does llama.cpp tokenize like training
(refused if not), and how far the quantized file is from the merged model it came from (a warning past the
documented thresholds). Written to `export_report.json` and printed.

Quality is measured along held-out answers, teacher-forced: the merged model and the GGUF see the same
tokens (prompt + reference answer), and at every answer position we compare their next-token distributions:
top-1 agreement, mean KL(merged ‖ GGUF), and both perplexities of the reference answer. The merged model runs
layer by layer from its files (layerwise.py), so nothing holds a whole model. The GGUF runs in llama.cpp when
llama-cpp-python is installed and the file is at most LLAMA_CPP_MAX_BYTES; otherwise layer by layer from its own
dequantized tensors (the weights are the file's; the matrix products' arithmetic is torch's, not llama.cpp's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from llamatune.errors import LlamatuneError

# Past these, the report warns that the quant type degrades the model (measured on the builtin model after
# the quickstart: llama.cpp's own Q4_K_M agrees on ~90% of answer tokens with KL ~0.05; its Q4_0 on ~72%, KL ~0.27).
WARN_MEAN_KL = 0.10
WARN_TOP1 = 0.85
_MAX_EXAMPLES = 8
# Largest GGUF whose quality is measured in llama.cpp itself: llama.cpp maps the whole file into memory, so a bigger
# one would make export's peak memory the model's size; those are run layer by layer (layerwise.py) instead.
LLAMA_CPP_MAX_BYTES = 2 * 2**30

# Held-out text for a model folder that is not a run's merge (no held-out data to take): original sentences.
_FALLBACK_TEXTS = [
    "The patient was started on a low dose and reviewed after two weeks; the rash had not returned.",
    "Either party may terminate this agreement on thirty days' written notice to the other party.",
    "Revenue grew 12% year over year, while operating margin narrowed because of higher input costs.",
    "To boil an egg, place it in cold water, bring the water to a boil, then simmer for nine minutes.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplast.",
]


def check_tokenizer(path: Path, tokenizer) -> dict:
    """Tokenizes 100 varied strings with llama.cpp from the GGUF at `path` and with the training tokenizer.

    Raises:
        LlamatuneError: If any string differs (the GGUF would not see prompts as the model was trained).
    """
    from llamatune.artifacts import llamacpp
    from llamatune.artifacts.probes import tokenizer_probes

    if not llamacpp.available():
        return {"checked": False, "why": "llama-cpp-python is not installed (pip install llama-cpp-python builds it)"}
    probes = tokenizer_probes()
    wrong = llamacpp.tokenizer_mismatches(path, tokenizer, probes)
    if wrong:
        text, want, got = wrong[0]
        raise LlamatuneError(
            f"llama.cpp tokenizes {len(wrong)} of {len(probes)} test strings differently from the training tokenizer "
            f"(first: {text!r}: training {want[:12]}, llama.cpp {got[:12]}); nothing was written. The tokenizer's "
            "pre-tokenization is one llama.cpp does not reproduce; deploy the merged folder with transformers or vLLM")
    return {"checked": True, "runtime": _llama_cpp_version(), "strings": len(probes), "identical": len(probes)}


def held_out(source: Path, tokenizer, say: Callable[[str], None]) -> tuple[list[tuple[list[int], list[int]]], str]:
    """(token ids, answer positions) of up to 8 held-out examples, and where they came from.

    The run's held-out split when `source` is a run's merge (merge_report.json names the run), else a few
    original sentences scored over every position.
    """
    from llamatune.data.encode import IGNORE_INDEX

    run = run_of(source)
    if run is not None:
        from llamatune.evaluate.scoring import eval_examples
        from llamatune.evaluate.target import Target
        from llamatune.recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(run / "recipe.yaml", saved=True)
            examples, _ = eval_examples(Target(None, tokenizer, False, str(run), recipe), [], _MAX_EXAMPLES)
        except (RecipeError, LlamatuneError, OSError) as exc:  # the run's data moved or changed since: say so, go on
            say(f"held-out data of {run} unreadable ({str(exc).splitlines()[0][:160]}); measuring on built-in sentences")
            examples = []
        seqs = [(list(e.input_ids), [t for t in range(len(e.labels) - 1) if e.labels[t + 1] != IGNORE_INDEX])
                for e in examples]
        seqs = [(ids, pos) for ids, pos in seqs if pos]
        if seqs:
            return seqs, f"held-out data of {run}"
    seqs = []
    for text in _FALLBACK_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        seqs.append((ids, list(range(len(ids) - 1))))
    return seqs, "built-in sentences (the source is not a run's merge)"


def quality(path: Path, config, weights, tokenizer, source: Path, say: Callable[[str], None]) -> dict:
    """Top-1 agreement, mean KL and perplexities of the GGUF at `path` against the source's weights (float32).

    The source runs layer by layer (layerwise.py), so no model is ever loaded whole; the GGUF runs in llama.cpp when
    it is installed and the file is at most LLAMA_CPP_MAX_BYTES, else layer by layer from its dequantized tensors.
    """
    import numpy as np

    from llamatune.artifacts import layerwise

    seqs, origin = held_out(source, tokenizer, say)
    prompts = [ids for ids, _ in seqs]
    reference = [r.numpy() for r in layerwise.logits(config, weights, prompts)]
    runtime, gguf_logits = _gguf_logits(path, config, prompts)
    agree = total = 0
    kl_sum = nll_ref = nll_gguf = 0.0
    for (ids, positions), ref, got in zip(seqs, reference, gguf_logits):
        p_ref, p_got = _log_softmax(ref[positions]), _log_softmax(got[positions])
        nxt = np.asarray(ids)[np.asarray(positions) + 1]
        agree += int((ref[positions].argmax(-1) == got[positions].argmax(-1)).sum())
        total += len(positions)
        kl_sum += float((np.exp(p_ref) * (p_ref - p_got)).sum())
        nll_ref -= float(p_ref[np.arange(len(nxt)), nxt].sum())
        nll_gguf -= float(p_got[np.arange(len(nxt)), nxt].sum())
    found = {"measured_in": runtime, "examples": len(seqs), "positions": total, "from": origin,
             "top1_agreement": agree / total, "mean_kl": kl_sum / total,
             "perplexity_merged": math.exp(nll_ref / total), "perplexity_gguf": math.exp(nll_gguf / total)}
    warnings = []
    if found["mean_kl"] > WARN_MEAN_KL or found["top1_agreement"] < WARN_TOP1:
        warnings.append(f"this quant type degrades the model: top-1 agreement {found['top1_agreement']:.1%} "
                        f"(warn below {WARN_TOP1:.0%}), mean KL {found['mean_kl']:.3f} (warn above {WARN_MEAN_KL}); "
                        "consider q5_k_m, q6_k or q8_0")
    found["warnings"] = warnings
    return found


def file_facts(path: Path) -> dict:
    """Size, bits per weight and tensor types of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    weights = sum(int(t.n_elements) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    size = path.stat().st_size
    return {"size_bytes": size, "size_mib": round(size / 2**20, 1), "parameters": weights,
            "bits_per_weight": round(8 * size / weights, 2), "tensor_types": types}


def summary_line(report: dict) -> str:
    """One line for the terminal: size, bits/weight, and quality when it was measured."""
    line = f"{report['file']['size_mib']:.1f} MiB, {report['file']['bits_per_weight']:.2f} bits/weight"
    q = report.get("quality")
    if q:
        line += (f"; vs merged on {q['positions']} answer tokens ({q['measured_in']}): top-1 {q['top1_agreement']:.1%}, "
                 f"KL {q['mean_kl']:.4f}, perplexity {q['perplexity_gguf']:.3f} (merged {q['perplexity_merged']:.3f})")
    return line


def _gguf_logits(path: Path, config, prompts: list[list[int]]):
    """(runtime name, float32 logits [len(ids), vocab] per prompt) of the GGUF: llama.cpp for a file of at most
    LLAMA_CPP_MAX_BYTES when it is installed, else llamatune's layer-by-layer pass over the dequantized tensors."""
    from llamatune.artifacts import llamacpp

    if llamacpp.available() and path.stat().st_size <= LLAMA_CPP_MAX_BYTES:
        llm = llamacpp.open_model(path, n_ctx=2048)
        try:
            return _llama_cpp_version(), [llamacpp.logits(llm, ids[: llm.n_ctx()]) for ids in prompts]
        finally:
            llm.close()
    from llamatune.artifacts import layerwise
    from llamatune.artifacts.weights import GGUFWeights

    why = "llama.cpp is not installed" if not llamacpp.available() else \
        f"the file is over {LLAMA_CPP_MAX_BYTES / 2**30:g} GiB, which llama.cpp would hold in memory whole"
    logits = layerwise.logits(config, GGUFWeights(path, config), prompts)
    return f"llamatune layer by layer on the dequantized tensors ({why})", [l.numpy() for l in logits]


def _log_softmax(x):
    import numpy as np

    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def run_of(source: Path) -> Path | None:
    """The run a merged folder came from (its merge_report.json names it), when that run is still there; a run
    itself (exported with its adapter merged on the fly) is its own."""
    from llamatune.artifacts.files import is_run

    if is_run(source):
        return source
    try:
        run = Path(json.loads((source / "merge_report.json").read_text())["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run if (run / "recipe.yaml").is_file() else None


def _llama_cpp_version() -> str:
    import llama_cpp

    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"
