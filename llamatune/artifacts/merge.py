"""`llamatune merge`: fold a run's adapter into its full-precision base and prove the result behaves the same.

The base is always loaded unquantized: a QLoRA adapter is merged into the original weights, never into
4-bit ones (rounding the merged weights back to 4 bits would change the model). The consequence is a
full-size model; the report states how far it is from the 4-bit model the adapter was trained with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from llamatune import model as models
from llamatune import strictjson
from llamatune.errors import LlamatuneError
from llamatune.recipe import load_recipe, redactor_of
from llamatune.progress import Phase
from llamatune.secrets import scrub
from llamatune.train.checkpoint import fault

# Largest acceptable disagreement between base+adapter and the merged model, by output dtype.
THRESHOLDS = {"fp32": {"max_abs_logit": 1e-3}, "bf16": {"mean_kl": 2e-2}, "fp16": {"mean_kl": 2e-3}}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def merge(run_dir: Path, out: Path | None = None, dtype: str = "fp32", verify: bool = True,
          say: Callable[[str], None] = print) -> Path:
    """Writes <run>/merged (or `out`): safetensors shards, config, generation config, tokenizer, model card,
    merge_report.json. Written in a staging folder and renamed, so an interrupted merge leaves nothing.

    One writer per output: the lock on `out` is held from the first check to the rename, so a second merge into
    the same folder stops at once (naming the first one's pid) instead of racing it to the rename.

    Raises:
        LlamatuneError: If the output exists or cannot be written, another process is writing it, a file of
            the run is damaged, or the merged model disagrees with base+adapter beyond the dtype's threshold
            (nothing is written then).
    """
    from llamatune import lock
    from llamatune.artifacts.files import check_output

    out = out or run_dir / "merged"
    check_output(out, "--out")  # before the lock, which creates out's parent folders
    with lock.hold(out, "merging"):
        check_output(out, "--out")  # again: a merge that finished while we waited for the lock wrote it
        recipe = load_recipe(run_dir / "recipe.yaml", saved=True)
        merged, tokenizer, report = _merged_model(run_dir, recipe, dtype, verify, say)
        # A fixed staging name, safe because the lock keeps every other writer of `out` away; so a staging
        # folder left by a killed merge is known for what it is and removed here.
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            with Phase(say, f"merge: writing {staging}"):
                merged.save_pretrained(staging, max_shard_size="2GB")
            fault("merge:after-weights")
            tokenizer.save_pretrained(staging)
            strictjson.write(staging / "merge_report.json", report)
            (staging / "README.md").write_text(_model_card(run_dir, recipe, report["base"], report))
            scrub(staging, redactor_of(recipe))  # no value from the environment in a folder meant to be shared
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    from llamatune.artifacts.serving import vllm_lora_check

    say("adapter for vLLM: " + "; ".join(vllm_lora_check(run_dir / "adapter")["notes"]))
    say(f"merged model: {out} (max |Δlogit| {report['merged_vs_unmerged']['max_abs_logit']:.2e}, "
        f"greedy agreement {report['merged_vs_unmerged']['greedy_agreement']:.1%})")
    return out


def _merged_model(run_dir: Path, recipe, dtype: str, verify: bool, say: Callable[[str], None]):
    """Loads base (full precision) + adapter, merges, checks parity on held-out prompts.

    Returns:
        (merged model in `dtype`, the run's tokenizer, the report)
    """
    import torch

    from llamatune.evaluate.scoring import Target, eval_examples, prompt_ids, run_tokenizer, with_adapter
    from llamatune.schema import QuantizationSpec

    ref = models.resolve(recipe.model, say)
    tokenizer = run_tokenizer(run_dir)
    with Phase(say, f"merge: loading {ref} in float32 and the adapter"):
        base = models.load_base(ref, recipe.model.model_copy(update={"dtype": "float32"}), QuantizationSpec())
        unmerged = with_adapter(base, run_dir).eval()
    examples, _ = eval_examples(Target(unmerged, tokenizer, True, str(run_dir), recipe), [], 8)
    # A window of plain text may have no prompt at all: the whole window is the input then.
    prompts = [torch.tensor([list(e.input_ids) if e.document else prompt_ids(e)]) for e in examples]
    with torch.no_grad(), Phase(say, "merge: reference logits of base + adapter", len(prompts), "prompts") as phase:
        reference = []
        for p in prompts:
            reference.append(unmerged(input_ids=p).logits.float())
            fault("merge:reference")  # a test makes this slow to see the phase's lines keep coming
            phase.advance()
    with Phase(say, f"merge: merging the adapter, weights to {dtype}"):
        merged = unmerged.merge_and_unload().to(getattr(torch, _DTYPES[dtype])).eval()
    merged.config.use_cache = True  # training turned it off; inference wants it
    with Phase(say, "merge: parity check of the merged model", len(prompts), "prompts") as phase:
        parity = compare_logits(merged, prompts, reference, tick=phase.advance)
    report = {"run": str(run_dir), "base": ref, "dtype": dtype, "prompts": len(prompts), "merged_vs_unmerged": parity}
    if recipe.quantization.mode != "none":
        with Phase(say, "merge: the trained 4-bit model vs the merged one"):
            report["trained_4bit_vs_merged"] = _quantized_gap(run_dir, recipe, ref, merged, prompts)
    _check(report["merged_vs_unmerged"], dtype, verify)

    eos = [tokenizer.eos_token_id] + [i for i in _as_list(merged.generation_config.eos_token_id) if i != tokenizer.eos_token_id]
    merged.generation_config.eos_token_id = eos  # stop at the end-of-turn token the adapter was trained to emit
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    return merged, tokenizer, report


def compare_logits(model, prompts, reference, tick: Callable[[], None] = lambda: None) -> dict:
    """max |Δlogit|, mean KL(reference ‖ model) per position, and greedy-token agreement.

    Args:
        model: The model under test (a causal LM).
        prompts: Token id tensors [1, T], one per prompt.
        reference: The reference model's logits for each prompt [1, T, vocab].
        tick: Called after each prompt (progress).
    """
    import torch

    worst, kls, agree, total = 0.0, [], 0, 0
    with torch.no_grad():
        for p, ref in zip(prompts, reference):
            got = model(input_ids=p.to(model.device)).logits.float().cpu()
            worst = max(worst, float((got - ref).abs().max()))
            kls.append(float(torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                        reduction="none").sum(-1).mean()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += ref.shape[1]
            tick()
    return {"max_abs_logit": worst, "mean_kl": sum(kls) / max(len(kls), 1), "greedy_agreement": agree / max(total, 1)}


def _check(found: dict, dtype: str, verify: bool) -> None:
    for key, limit in THRESHOLDS[dtype].items():
        if verify and found[key] > limit:
            raise LlamatuneError(f"the merged model disagrees with base+adapter: {key} {found[key]:.3g} > {limit:g} for "
                                 f"{dtype}; nothing was written. Try --dtype fp32, or --no-verify to keep it anyway")


def _quantized_gap(run_dir: Path, recipe, ref: str, merged, prompts) -> dict:
    """How far the merged full-precision model is from the 4-bit model the adapter was trained with."""
    import torch
    from llamatune.evaluate.scoring import with_adapter

    trained = with_adapter(models.load_base(ref, recipe.model, recipe.quantization), run_dir).eval()
    with torch.no_grad():
        reference = [trained(input_ids=p).logits.float().cpu() for p in prompts]
    return compare_logits(merged, prompts, reference)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _model_card(run_dir: Path, recipe, ref: str, report: dict) -> str:
    summary = _read_json(run_dir / "summary.json")
    manifest = _read_json(run_dir / "data_manifest.json")
    sources = ", ".join(f"{s['path']} ({s['format']})" for s in manifest.get("sources", []) if s["split"] == "train")
    lines = [
        f"# {run_dir.name} (merged)", "",
        f"Base model `{ref}` with a LoRA adapter (r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, targets "
        f"{recipe.lora.target_modules}) merged in {report['dtype']} by llamatune.", "",
        f"- Training data: {sources or 'see recipe.yaml'}; data fingerprint {(summary.get('data_fingerprint') or _fp(manifest))[:16]}",
        f"- {_system_line(manifest)}",
        f"- Steps: {summary.get('steps', '?')}; held-out loss {_loss(summary.get('eval_loss_before'))} → "
        f"{_loss(summary.get('eval_loss_after'))}",
        f"- Parity with base + adapter on {report['prompts']} held-out prompts: max |Δlogit| "
        f"{report['merged_vs_unmerged']['max_abs_logit']:.2e}, greedy agreement {report['merged_vs_unmerged']['greedy_agreement']:.1%}",
    ]
    if "trained_4bit_vs_merged" in report:
        gap = report["trained_4bit_vs_merged"]
        lines.append(f"- Trained on a 4-bit base, merged into the full-precision one: vs the 4-bit model, max |Δlogit| "
                     f"{gap['max_abs_logit']:.2e}, greedy agreement {gap['greedy_agreement']:.1%}")
    eval_md = run_dir / "eval" / "eval.md"
    if eval_md.is_file():
        table = [l for l in eval_md.read_text().splitlines() if l.startswith("|")]
        lines += ["", "## Evaluation", "", *table]
    lines += ["", "## License", "", "This model inherits the license of its base model; the fine-tuning data's licenses "
              "apply to what it learned. Check both before distributing it.", ""]
    return "\n".join(lines)


def _loss(value) -> str:
    """A held-out loss for the card; a pass that was not run (train.eval_before: false) says so."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not measured"


def _system_line(manifest: dict) -> str:
    from llamatune.data.encode import describe_system

    line = describe_system(manifest.get("system_prompt"))
    return line[0].upper() + line[1:]


def _fp(manifest: dict) -> str:
    from llamatune.data.pipeline import fingerprint

    return fingerprint(manifest) if manifest.get("sources") else "unknown"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
