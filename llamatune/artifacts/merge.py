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
        # A fixed staging name, safe because the lock keeps every other writer of `out` away; so a staging
        # folder left by a killed merge is known for what it is and removed here.
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            report, tokenizer = _merge_into(staging, run_dir, recipe, dtype, say)
            _check(report["merged_vs_unmerged"], dtype, verify)  # fails before anything is renamed into place
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


def _merge_into(staging: Path, run_dir: Path, recipe, dtype: str, say: Callable[[str], None]) -> tuple[dict, object]:
    """Writes the merged weights, config and generation config into `staging`; returns (report, run's tokenizer).

    A plain LoRA adapter (every run llamatune trains, unless lora.use_dora) is merged tensor by tensor: each base
    weight is read, its `scale · B @ A` added in float32, and written in `dtype`, so memory holds one tensor, never
    the model. Anything else (DoRA's magnitudes, saved modules) goes through peft's merge_and_unload of the whole
    model, said on the terminal and in the report.
    """
    from llamatune.artifacts import lora
    from llamatune.artifacts.gguf_lora import _config, base_folder
    from llamatune.evaluate.target import run_tokenizer

    base = base_folder(run_dir, say)
    # the base as the recipe names it: a hub id stays one, anything else is the local folder (resolved once: a
    # .gguf base is hashed on every resolve)
    ref = recipe.model.path if models.classify(recipe.model.path) == "hub" else str(base)
    config = _config(base)
    tokenizer = run_tokenizer(run_dir)
    deltas = lora.Deltas(run_dir, config)
    prompts = _parity_prompts(run_dir, recipe, tokenizer)
    if deltas.problems:
        say("merge: in memory with peft (the adapter is more than W + scale·BA: "
            + "; ".join(p.split(": ", 1)[-1][:80] for p in deltas.problems[:2]) + ")")
        report = _merge_in_memory(staging, run_dir, recipe, base, dtype, prompts, say)
        report["method"] = "peft merge_and_unload, whole model in memory"
    else:
        report = _merge_streamed(staging, base, config, deltas, dtype, prompts, say)
        report["method"] = "tensor by tensor (base + scale·B@A in float32), parity layer by layer"
        if recipe.quantization.mode == "nf4":
            with Phase(say, "merge: the trained 4-bit model vs the merged one, layer by layer", config.num_hidden_layers,
                       "layers") as phase:
                report["trained_4bit_vs_merged"] = _nf4_gap(base, config, deltas, recipe, staging, prompts, phase.advance)
        elif recipe.quantization.mode != "none":
            with Phase(say, "merge: the trained 8-bit model vs the merged one (whole model in memory)"):
                report["trained_4bit_vs_merged"] = _quantized_gap(run_dir, recipe, str(base), _load(staging), prompts)
    _write_configs(staging, base, config, dtype, tokenizer)
    return {"run": str(run_dir), "base": ref, "dtype": dtype, "prompts": len(prompts), **report}, tokenizer


# Parity is measured on at most this many tokens in all: both sets of logits are kept (an 8B model's 128k vocabulary
# makes that 0.5 GB each at this size).
PARITY_TOKENS = 1024


def _parity_prompts(run_dir: Path, recipe, tokenizer) -> list[list[int]]:
    """Up to 8 held-out prompts (a plain-text window whole), each cut to its share of PARITY_TOKENS."""
    from llamatune.evaluate.scoring import eval_examples, prompt_ids
    from llamatune.evaluate.target import Target

    examples, _ = eval_examples(Target(None, tokenizer, False, str(run_dir), recipe), [], 8)
    # A window of plain text may have no prompt at all: the whole window is the input then.
    prompts = [list(e.input_ids) if e.document else list(prompt_ids(e)) for e in examples]
    share = PARITY_TOKENS // max(len(prompts), 1)
    return [p[:share] for p in prompts if p]


def _merge_streamed(staging: Path, base: Path, config, deltas, dtype: str, prompts: list[list[int]],
                    say: Callable[[str], None]) -> dict:
    import torch

    from llamatune.artifacts import layerwise
    from llamatune.artifacts.tensors import Safetensors, SafetensorsWriter
    from llamatune.artifacts.weights import FolderWeights, MergedWeights, row_blocks

    files = Safetensors.folder(base)
    merged_weights = MergedWeights(base, deltas)
    out_dtype = getattr(torch, _DTYPES[dtype])
    tied = getattr(config, "tie_word_embeddings", False)
    names = [n for n in files.names() if not (tied and n == "lm_head.weight")]  # as save_pretrained drops a tied head
    plan = [(n, out_dtype if files.dtype(n).is_floating_point else files.dtype(n), files.shape(n)) for n in names]
    writer = SafetensorsWriter(staging, plan, max_shard_bytes=2 * 10**9)
    try:
        with Phase(say, f"merge: base + adapter to {dtype}, tensor by tensor", len(plan), "tensors") as phase:
            for name, kind, _ in plan:  # a block of rows at a time: an 8B model's embeddings are 2 GB in float32
                writer.write_chunks(name, row_blocks(merged_weights, name, kind) if kind.is_floating_point
                                    else [files.read(name)])
                phase.advance()
        writer.close()
    finally:
        writer.abort()
    fault("merge:after-weights")
    with Phase(say, "merge: reference logits of base + adapter, layer by layer", config.num_hidden_layers,
               "layers") as phase:
        reference = layerwise.logits(config, FolderWeights(base), prompts, layerwise.lora_hooks(deltas),
                                     tick=lambda: (fault("merge:reference"), phase.advance()))
    with Phase(say, "merge: parity check of the merged files, layer by layer", config.num_hidden_layers,
               "layers") as phase:
        merged = layerwise.logits(config, FolderWeights(staging), prompts, tick=phase.advance)
    return {"merged_vs_unmerged": layerwise.compare(merged, reference)}


def _nf4_gap(base: Path, config, deltas, recipe, staging: Path, prompts, tick) -> dict:
    """The merged model against the one the adapter was trained with: every projection rounded to nf4 by
    bitsandbytes' own quantizer (block size 64, the recipe's double quantization) and back, the adapter unmerged on
    top, computed in float32 layer by layer."""
    from llamatune.artifacts import layerwise
    from llamatune.artifacts.weights import FolderWeights, Nf4Weights
    from llamatune.model import resolve_dtype, training_precision

    stored = resolve_dtype(recipe.model.dtype, training_precision(recipe.train.precision))  # what training loaded
    rounded = Nf4Weights(FolderWeights(base), stored, recipe.quantization.double_quant)
    trained = layerwise.logits(config, rounded, prompts, layerwise.lora_hooks(deltas), tick=tick)
    merged = layerwise.logits(config, FolderWeights(staging), prompts)
    return layerwise.compare(merged, trained)


def _write_configs(staging: Path, base: Path, config, dtype: str, tokenizer) -> None:
    """config.json (the output dtype, the KV cache back on) and generation_config.json stopping at the
    end-of-turn token the adapter was trained to emit."""
    import copy

    import torch
    from transformers import GenerationConfig

    config = copy.deepcopy(config)
    config.dtype = getattr(torch, _DTYPES[dtype])
    config.use_cache = True  # training turned it off; inference wants it
    config.save_pretrained(staging)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:  # the base has none
        generation = GenerationConfig.from_model_config(config)
    eos = [tokenizer.eos_token_id] + [i for i in _as_list(generation.eos_token_id) if i != tokenizer.eos_token_id]
    generation.eos_token_id = eos
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(staging)


def _merge_in_memory(staging: Path, run_dir: Path, recipe, base: Path, dtype: str, prompts: list[list[int]],
                     say: Callable[[str], None]) -> dict:
    """peft's merge_and_unload on the whole model loaded in float32: for adapters that are more than W + scale·BA."""
    import torch

    from llamatune.evaluate.target import with_adapter
    from llamatune.schema import QuantizationSpec

    with Phase(say, f"merge: loading {base} in float32 and the adapter"):
        loaded = models.load_base(str(base), recipe.model.model_copy(update={"dtype": "float32"}), QuantizationSpec())
        unmerged = with_adapter(loaded, run_dir).eval()
    inputs = [torch.tensor([p]) for p in prompts]
    with torch.no_grad(), Phase(say, "merge: reference logits of base + adapter", len(inputs), "prompts") as phase:
        reference = []
        for p in inputs:
            reference.append(unmerged(input_ids=p).logits.float())
            fault("merge:reference")  # a test makes this slow to see the phase's lines keep coming
            phase.advance()
    with Phase(say, f"merge: merging the adapter, weights to {dtype}"):
        merged = unmerged.merge_and_unload().to(getattr(torch, _DTYPES[dtype])).eval()
    with Phase(say, "merge: parity check of the merged model", len(inputs), "prompts") as phase:
        report = {"merged_vs_unmerged": compare_logits(merged, inputs, reference, tick=phase.advance)}
    if recipe.quantization.mode != "none":
        with Phase(say, "merge: the trained 4-bit model vs the merged one"):
            report["trained_4bit_vs_merged"] = _quantized_gap(run_dir, recipe, str(base), merged, inputs)
    with Phase(say, f"merge: writing {staging}"):
        merged.save_pretrained(staging, max_shard_size="2GB")  # its config and generation config are rewritten after
    fault("merge:after-weights")
    return report


def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


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
    from llamatune.evaluate.target import with_adapter

    prompts = [p if torch.is_tensor(p) else torch.tensor([p]) for p in prompts]
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
