"""`llamatune eval`: score held-out data with the tuned model and, on the same loaded model with the
adapter switched off, with its base; per-example scores feed bootstrap intervals.

Per example: answer-only loss (prompt tokens excluded); for classification / multiple choice the
log-likelihood of every choice (accuracy, and a per-token length-normalized variant); with
generation, greedy answers scored by exact match, token F1 and ROUGE-L.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from rich.markup import escape

from llamatune.data.batches import collate, unpacked
from llamatune.data.encode import IGNORE_INDEX, Example
from llamatune.errors import RecipeError
from llamatune.evaluate.metrics import exact_match, rouge_l, token_f1
from llamatune.evaluate.target import Target, load_other_run, load_start, load_target
from llamatune.train.checkpoint import fault


def eval_examples(target: Target, data: list[str], limit: int | None,
                  say: Callable[[str], None] | None = None) -> tuple[list[Example], dict]:
    """Held-out examples through the training pipeline: the run's own held-out data by default, or
    each --data entry (a recipe file: its held-out data; a data file: read like the run's first source).

    Returns:
        (examples, the data manifests by entry)
    """
    from llamatune.data.pipeline import build_datasets
    from llamatune.recipe import load_recipe

    if not data and target.recipe is None:
        raise RecipeError(["--data is required for a model folder or .gguf file: give a recipe file (its held-out data)"])
    specs = []  # (name, what to call it in an error, data spec, seed): a recipe's own seed reproduces its held-out split
    for entry in data or [None]:
        if entry is None:
            specs.append(("run held-out data", f"held-out data of {Path(target.name) / 'recipe.yaml'}", target.recipe.data,
                          target.recipe.train.seed))
        elif entry.endswith((".yaml", ".yml")):
            other = load_recipe(entry)
            specs.append((entry, f"--data {entry}", other.data, other.train.seed))
        elif target.recipe is None:
            raise RecipeError([f"--data {entry}: a data file needs a run directory (its recipe says how to read it); "
                               "give a recipe file instead"])
        else:
            source = target.recipe.data.train[0].model_copy(update={"path": str(Path(entry).resolve()), "weight": 1.0})
            spec = target.recipe.data.model_copy(update={"train": (source,), "eval": (source,), "eval_fraction": None,
                                                         "max_overlap": 1.0, "dedup": False})
            specs.append((entry, f"--data {entry} (read like the run's first source)", spec, target.recipe.train.seed))
    examples, manifests = [], {}
    for name, label, spec, seed in specs:
        try:
            # Unpacked, so every example is scored on its own.
            built = build_datasets(spec.model_copy(update={"packing": False}), target.tokenizer, seed, say=say)
        except RecipeError as exc:  # say which of the evaluated data sets it is
            raise RecipeError([f"{label}: {p}" for p in exc.problems], source=exc.source) from None
        examples += [row[0] for row in built.eval]
        manifests[name] = built.manifest
    return examples[:limit] if limit else examples, manifests


def score(target: Target, examples: list[Example], adapter: bool | str, generate: bool, max_new_tokens: int,
          batch_size: int = 8, progress: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Per-example scores with the adapter on (tuned), off (base), or another loaded adapter by name ("start")."""
    import torch

    model, tok = target.model, target.tokenizer
    if isinstance(adapter, str):
        switch = _using(model, adapter)
    else:
        switch = nullcontext() if adapter or not target.has_adapter else model.disable_adapter()
    out: list[dict] = []
    with torch.no_grad(), switch:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            choices = [_choice_scores(model, tok, e) if e.choices else None for e in chunk]
            pairs = _pair_scores(model, tok, [e for e in chunk if e.is_pair])
            # The gold choice's score is the answer loss when it was tokenized as in training: skip a second forward.
            rest = [i for i, c in enumerate(choices) if (c is None or "loss_sum" not in c) and not chunk[i].is_pair]
            losses = dict(zip(rest, _row_losses(model, collate(unpacked([chunk[i] for i in rest]), tok.pad_token_id)))) if rest else {}
            texts = _generate(model, tok, chunk, max_new_tokens) if generate else [None] * len(chunk)
            for i, (example, text) in enumerate(zip(chunk, texts)):
                record: dict = {"loss_sum": losses[i][0], "tokens": losses[i][1]} if i in losses else {}
                if example.is_pair:
                    record.update(pairs.pop(0))
                if example.choices:
                    record.update(choices[i])
                elif text is not None:
                    reference = reference_text(tok, example)
                    record.update(prediction=text, exact_match=exact_match(text, reference),
                                  f1=token_f1(text, reference), rouge_l=rouge_l(text, reference))
                out.append(record)
            fault("eval:batch")  # a test makes this slow to see the progress lines keep coming
            progress(len(chunk))
    return out


class _using:
    """Scores with the named adapter active, then makes the run's own ("default") active again."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        self.model.set_adapter("default")
        return False


def prompt_ids(example: Example) -> list[int]:
    """Tokens before the first trained one: what the model sees at inference."""
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return list(example.input_ids[:first])


def reference_text(tokenizer, example: Example) -> str:
    """The trained answer as text, without the template's end-of-turn tokens."""
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True).strip()


def _row_losses(model, batch: dict) -> list[tuple[float, int]]:
    """Summed answer-token cross-entropy and answer-token count of every row.

    Only positions that predict an answer token reach the vocabulary projection (as in training's loss):
    a classification prompt of 500 tokens with a 2-token answer costs 2 rows of logits, not 500.
    """
    import torch
    import torch.nn.functional as F

    from llamatune.train.loss import label_positions

    labels = batch["labels"]
    keep, columns, chosen, targets = label_positions(labels)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                   logits_to_keep=columns).logits[chosen].float()
    per_token = F.cross_entropy(logits, targets, reduction="none")
    rows = keep.nonzero()[:, 0]  # the row of each kept position, in the same row-major order
    sums = torch.zeros(len(labels), dtype=per_token.dtype).index_add_(0, rows, per_token)
    counts = keep.sum(1)
    return [(float(sums[r]), int(counts[r])) for r in range(len(labels))]


def _pair_scores(model, tok, pairs: list[Example]) -> list[dict]:
    """Preference pairs: the summed log-prob of the chosen and of the rejected answer given the prompt (one forward,
    the prompt encoded once), whether the model prefers the chosen one, in total and per token, and by how much.
    The chosen answer's loss is its answer loss, as for an instruction example."""
    if not pairs:
        return []
    from llamatune.train.preference import pair_logps

    logps, counts = pair_logps(model, collate(unpacked(pairs), tok.pad_token_id))
    out = []
    for (c, r), (nc, nr) in zip(logps.tolist(), counts.tolist()):
        out.append({"loss_sum": -c, "tokens": int(nc), "logp_chosen": c, "logp_rejected": r,
                    "preference_accuracy": float(c > r), "preference_accuracy_norm": float(c / nc > r / nr),
                    "preference_margin": c - r, "preference_margin_norm": c / nc - r / nr})
    return out


def _choice_scores(model, tok, example: Example) -> dict:
    """Log-likelihood of every choice as the answer; the gold one is the choice the example trains.

    One forward scores all choices: the row is [prompt, choice 1, choice 2, ...] with a mask that lets each
    choice see the prompt and itself only, and positions that continue the prompt's for every choice, so
    the long prompt is encoded once instead of once per choice.
    """
    import torch

    trained = tok.decode([t for t in example.labels if t != IGNORE_INDEX])
    gold = max((c for c in example.choices if trained.startswith(c)), key=len)
    suffix = trained[len(gold):]  # the template's end of turn, e.g. "<|im_end|>\n"
    prompt = prompt_ids(example)
    completions = [tok(choice + suffix, add_special_tokens=False)["input_ids"] for choice in example.choices]
    n, total = len(prompt), len(prompt) + sum(len(c) for c in completions)
    mask = torch.zeros((total, total), dtype=torch.bool)
    mask[:n, :n] = torch.ones((n, n), dtype=torch.bool).tril()
    positions, sources, start = list(range(n)), [], n  # sources: the row whose logits predict each completion token
    for completion in completions:
        k = len(completion)
        mask[start : start + k, :n] = True
        mask[start : start + k, start : start + k] = torch.ones((k, k), dtype=torch.bool).tril()
        positions += range(n, n + k)
        sources.append([n - 1] + list(range(start, start + k - 1)))
        start += k
    ids = torch.tensor([prompt + [t for c in completions for t in c]])
    # Only rows from the last prompt token on predict a completion token: the prompt's logits are never made.
    logits = model(input_ids=ids, attention_mask=mask[None, None], position_ids=torch.tensor([positions]),
                   logits_to_keep=total - n + 1).logits[0].float()
    logprobs = logits.log_softmax(-1)
    scores = [float(logprobs[torch.tensor(rows) - (n - 1), torch.tensor(c)].sum()) for rows, c in zip(sources, completions)]
    lengths = [len(c) for c in completions]
    best = max(range(len(scores)), key=scores.__getitem__)
    best_norm = max(range(len(scores)), key=lambda i: scores[i] / lengths[i])
    out = {"gold": gold, "predicted": example.choices[best], "accuracy": float(example.choices[best] == gold), "suffix": suffix,
           "accuracy_norm": float(example.choices[best_norm] == gold), "choice_logprobs": scores}
    g = example.choices.index(gold)
    if completions[g] == [t for t in example.labels if t != IGNORE_INDEX][-len(completions[g]):] and \
            len(completions[g]) == sum(1 for t in example.labels[1:] if t != IGNORE_INDEX):
        out.update(loss_sum=-scores[g], tokens=len(completions[g]))  # the trained tokens, scored in this same forward
    return out


def _generate(model, tok, examples: list[Example], max_new_tokens: int) -> list[str | None]:
    """Greedy answers for the examples without a closed answer set, batched with left padding."""
    import torch

    # A window of plain text has no question: continuing it from its first tokens would score the model on
    # guessing the document, not on answering, so such windows are scored by their loss alone.
    wanted = [i for i, e in enumerate(examples) if not e.choices and not e.document]
    texts: list[str | None] = [None] * len(examples)
    if not wanted:
        return texts
    prompts = [prompt_ids(examples[i]) for i in wanted]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=True)
    for r, i in enumerate(wanted):
        texts[i] = tok.decode(out[r, width:], skip_special_tokens=True).strip()
    return texts


def run_eval(path: Path, data: list[str], compare: list[str], generate: bool, limit: int | None, out_dir: Path | None,
             max_new_tokens: int, batch_size: int, console) -> dict:
    """The whole `llamatune eval`: load, read data, score tuned and each comparison (base: the adapter off; start:
    the adapter the run started from; teacher: a distillation run's teacher), report. Returns the summary."""
    from llamatune.artifacts.files import check_output, target_kind
    from llamatune.evaluate import classes
    from llamatune.evaluate import report as evalreport
    from llamatune.progress import Phase

    compare = list(dict.fromkeys(compare))
    kind = target_kind(path)
    out_dir = out_dir or {"run": path / "eval", "checkpoint": path.parent.parent / "eval" / path.name}.get(kind, Path("eval") / path.stem)
    check_output(out_dir, "--out", existing_folder_ok=True)  # now, not after the scoring
    with Phase(console, f"eval: loading {path.name}"):
        target = load_target(path, say=console.print)
    if compare and not target.has_adapter:
        raise RecipeError([f"--compare {compare[0]} needs a run directory (an adapter to switch off); {path} is a plain model"])
    passes = [("tuned", target, True)]
    for i, name in enumerate(compare):
        if name == "start":
            load_start(target, path)
        elif name not in ("base", "teacher"):
            load_other_run(target, path, Path(name), f"other{i}")
        passes.append((name if name in ("base", "start", "teacher") else Path(name).name,
                       _teacher_target(target, path, console) if name == "teacher" else target,
                       {"base": False, "start": "start", "teacher": True}.get(name, f"other{i}")))
    compare = [name for name, _, _ in passes[1:]]
    examples, manifests = eval_examples(target, data, limit, say=console.print)
    if not examples:
        raise RecipeError(["no held-out examples to evaluate"])
    leaked = _overlap_with_training(target, examples, say=console.print)
    if leaked:
        console.print(f"[yellow]warning:[/] {leaked} of {len(examples)} evaluation examples also occur in this run's "
                      "training data; their scores say little about generalisation")
    scores = {}
    for name, scored, adapter in passes:
        with Phase(console, f"eval {name}", total=len(examples), unit="examples") as phase:
            scores[name] = score(scored, examples, adapter, generate, max_new_tokens, batch_size, progress=phase.advance)
    choice_sets = [e.choices for e in examples]
    if len(compare) <= 1:
        # One comparison is stored as "base" whichever model it scores (eval.json's compare says which).
        other = scores.pop(compare[0]) if compare else None
        if other is not None:
            scores["base"] = other
        answers = classes.breakdown(choice_sets, scores["tuned"], other)
        summary = evalreport.with_macro_f1(evalreport.summarize(scores["tuned"], other), answers)
    else:
        answers = classes.breakdown(choice_sets, scores["tuned"], scores[compare[0]])
        summary = evalreport.side_by_side({c: evalreport.with_macro_f1(evalreport.summarize(scores["tuned"], scores[c]),
                                                                       classes.breakdown(choice_sets, scores["tuned"], scores[c]))
                                           for c in compare})
    notes, rules = _notes(examples, generate), scoring_rules(scores["tuned"], generate)
    warnings = evalreport.small_samples(summary) + classes.collapse_warnings(answers)
    against = compare if len(compare) > 1 else (compare[0] if compare else "base")
    evalreport.show(summary, console, against=against)
    evalreport.show_answers(answers, console)
    for line in [f"scoring: {rule}" for rule in rules] + notes:
        console.print(line, highlight=False, markup=False)
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    samples = _samples(target.tokenizer, examples, scores)
    fingerprints = {name: _fingerprint(m) for name, m in manifests.items()}
    header = {"target": str(path), "examples": len(examples), "compare_base": compare == ["base"],
              "compare": compare if len(compare) > 1 else (compare[0] if compare else None), "generate": generate,
              "max_new_tokens": max_new_tokens, "data_fingerprints": fingerprints, "overlap_with_training": leaked,
              "scoring": rules, "notes": notes, "warnings": warnings, "answers": answers}
    if "teacher" in compare:
        header["teacher"] = target.recipe.distill.teacher
    evalreport.write(out_dir, summary, header, samples)
    if target.recipe is not None:
        from llamatune.recipe import redactor_of
        from llamatune.secrets import scrub

        scrub(out_dir, redactor_of(target.recipe))  # samples carry their source paths
    console.print(f"reports: {out_dir}/eval.json, eval.md, samples.jsonl")
    if kind in ("run", "checkpoint"):
        from llamatune.train.tracking import log_eval

        run = path if kind == "run" else path.parent.parent
        log_eval(run, summary, out_dir, None if kind == "run" else int(path.name.split("-")[-1]), console.print)
    return summary


def _teacher_target(target: Target, path: Path, console) -> Target:
    """The teacher a distillation run learned from (its recipe's distill.teacher), scored with the run's tokenizer
    (training checked that the two share one vocabulary)."""
    from llamatune.train.teacher import load_teacher

    if target.recipe is None or target.recipe.train.method != "distill":
        raise RecipeError([f"--compare teacher needs a run trained with train.method: distill (it names its teacher in "
                           f"distill.teacher); {path} is not one: use --compare base"])
    model, _ = load_teacher(target.recipe.distill.teacher, "fp32", console.print)
    return Target(model, target.tokenizer, False, target.recipe.distill.teacher)


def scoring_rules(tuned: list[dict], generate: bool) -> list[str]:
    """What each reported metric scores, in words, for the kinds of examples evaluated (printed and in eval.json)."""
    rules = ["loss and perplexity: the cross-entropy of the answer tokens only (the prompt is not scored), including the "
             "chat template's end-of-turn tokens that training taught; token-weighted over examples; perplexity = exp(loss)"]
    suffixes = sorted({r["suffix"] for r in tuned if "suffix" in r})
    if suffixes:
        rules.append("accuracy (classification, multiple choice): every choice is scored as the summed log-probability, "
                     "given the prompt, of its tokens followed by what the template puts after an answer "
                     f"({', '.join(map(repr, suffixes))}), exactly as the answer was trained; the highest total is the "
                     "prediction. accuracy_norm divides each total by its token count first (long choices are not "
                     "penalised). macro_f1: the mean per-answer F1 of those predictions")
    if any("preference_accuracy" in r for r in tuned):
        rules.append("preference_accuracy (preference pairs): the share of pairs whose chosen answer has the higher summed "
                     "log-probability given the prompt (end-of-turn tokens included, as trained); _norm compares per-token "
                     "means (a long chosen answer is not penalised for its length); preference_margin: the mean log-prob "
                     "difference chosen - rejected (nats; _norm per token). loss and perplexity: of the chosen answers")
    if generate and any("prediction" in r for r in tuned):
        rules.append("exact_match, f1, rouge_l: greedy generation from the prompt, compared with the trained answer without "
                     "its end-of-turn tokens; exact match and F1 after SQuAD normalisation (lowercase, no punctuation or "
                     "articles), ROUGE-L F-measure from rouge-score")
    return rules


def _samples(tokenizer, examples: list[Example], scores: dict[str, list[dict]]) -> list[dict]:
    """One line of samples.jsonl per example: prompt, reference, and each pass's loss, output and scores."""
    samples = []
    for i, example in enumerate(examples):
        sample = {"prompt": tokenizer.decode(prompt_ids(example)), "reference": reference_text(tokenizer, example)}
        if example.is_pair:  # the generated answer (with --generate) next to both
            sample["chosen"] = sample["reference"]
            sample["rejected"] = tokenizer.decode([t for t in example.rejected_labels if t != IGNORE_INDEX],
                                                  skip_special_tokens=True).strip()
        for name in scores:
            s = scores[name][i]
            sample[name] = {"loss": s["loss_sum"] / max(s["tokens"], 1), "output": s.get("prediction", s.get("predicted")),
                            **{k: s[k] for k in ("accuracy", "exact_match", "f1", "rouge_l", "logp_chosen", "logp_rejected",
                                                 "preference_accuracy") if k in s}}
        samples.append(sample)
    return samples


def _notes(examples: list[Example], generate: bool) -> list[str]:
    """What the report must say about the examples it could not score every way."""
    windows = sum(e.document for e in examples)
    if not (generate and windows):
        return []
    return [f"generation: {windows} of {len(examples)} examples are windows of plain text (format text) with no question "
            "to answer; they are scored by answer loss and perplexity only, not by exact match, F1 or ROUGE-L"]


def _fingerprint(manifest: dict) -> str:
    from llamatune.data.pipeline import fingerprint

    return fingerprint(manifest)


def _overlap_with_training(target: Target, examples: list[Example], say: Callable[[str], None] = print) -> int:
    """Evaluation examples whose tokens equal a training example of the run (0 for a plain model)."""
    if target.recipe is None:
        return 0
    from llamatune.data.pipeline import build_datasets

    spec = target.recipe.data.model_copy(update={"packing": False})
    train = build_datasets(spec, target.tokenizer, target.recipe.train.seed, say=say).train
    seen = {row[0].input_ids for row in train}
    return sum(e.input_ids in seen for e in examples)
