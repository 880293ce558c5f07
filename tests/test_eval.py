"""`llamatune eval` against independent computations, and base vs tuned on one loaded model."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import CORPUS, write_jsonl
from llamatune.cli import app
from llamatune.data.encode import encode
from llamatune.evaluate.scoring import score
from llamatune.evaluate.target import load_target
from llamatune.evaluate.metrics import bootstrap_ci, exact_match, rouge_l, token_f1
from llamatune.recipe import load_recipe
from llamatune.train.loop import train


def test_exact_match_and_f1_on_hand_made_pairs():
    assert exact_match("The Aorta.", "aorta") == 1.0 and exact_match("left aorta", "aorta") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0
    assert rouge_l("the cat is on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)


def test_bootstrap_interval_contains_the_estimate_and_pairs_differences():
    est, low, high = bootstrap_ci([0, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    assert est == 0.7 and low <= est <= high and high - low > 0.1
    same = bootstrap_ci([1.0, 2.0, 3.0], paired=[1.0, 2.0, 3.0])
    assert same == (0.0, 0.0, 0.0)
    weighted, _, _ = bootstrap_ci([1.0, 3.0], weights=[3, 1])
    assert weighted == pytest.approx(1.5)


def test_loss_and_perplexity_equal_a_manual_sum_of_token_logprobs(tiny_model_dir):
    target = load_target(tiny_model_dir)
    example = encode(target.tokenizer, "What is a fever?", "A high temperature.")
    [record] = score(target, [example], adapter=False, generate=False, max_new_tokens=1)
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logprobs = target.model(input_ids=ids).logits[0].log_softmax(-1)
    manual = -sum(float(logprobs[t - 1, ids[0, t]]) for t, label in enumerate(example.labels) if label != -100 and t > 0)
    n = sum(1 for t, label in enumerate(example.labels) if label != -100 and t > 0)
    assert record["tokens"] == n
    assert record["loss_sum"] == pytest.approx(manual, rel=1e-5)
    assert math.exp(record["loss_sum"] / n) == pytest.approx(math.exp(manual / n), rel=1e-5)


def test_choice_scores_in_one_forward_equal_one_forward_per_choice(tiny_model_dir):
    from llamatune.data.encode import Example
    from llamatune.evaluate.scoring import _choice_scores, prompt_ids

    target = load_target(tiny_model_dir)
    tok = target.tokenizer
    choices = ("yes", "no", "maybe")
    base = encode(tok, "Does the abstract support the claim? Answer with one of: yes, no, maybe.", "maybe")
    example = Example(base.input_ids, base.labels, choices)
    got = _choice_scores(target.model, tok, example)
    trained = tok.decode([t for t in example.labels if t != -100])
    suffix = trained[len("maybe"):]
    prompt = prompt_ids(example)
    for choice, score_ in zip(choices, got["choice_logprobs"]):
        completion = tok(choice + suffix, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logprobs = target.model(input_ids=ids).logits[0].float().log_softmax(-1)
        manual = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))
        assert score_ == pytest.approx(manual, rel=1e-4, abs=1e-4)
    assert got["gold"] == "maybe" and got["predicted"] in choices
    from llamatune.data.batches import collate, unpacked
    from llamatune.evaluate.scoring import _row_losses

    with torch.no_grad():
        [(loss_sum, n)] = _row_losses(target.model, collate(unpacked([example]), tok.pad_token_id))
    assert got["tokens"] == n and got["loss_sum"] == pytest.approx(loss_sum, rel=1e-4)  # one forward serves both


@pytest.fixture(scope="module")
def fixed_answer_run(tmp_path_factory, tiny_model_dir):
    """An adapter trained to answer 'Yes' to every question (classification with labels Yes / No)."""
    folder = tmp_path_factory.mktemp("fixed")
    rows = [{"text": f"Statement number {i} about a contract clause.", "label": "Yes"} for i in range(40)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "eval.jsonl", [{"text": f"Another clause {i} to classify.", "label": "Yes"} for i in range(12)])
    source = "format: classification\n    prompt: '{text}'\n    answer: '{label}'\n    labels: ['Yes', 'No']"
    recipe = folder / "r.yaml"
    # fp32: the loss margin asserted below must not depend on whether this CPU computes bf16 natively (auto).
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\nlora:\n  r: 8\n  dropout: 0.0\ndata:\n  train:\n    path: train.jsonl\n"
                      f"    {source}\n  eval:\n    path: eval.jsonl\n    {source}\n  max_overlap: 1.0\n"
                      "train:\n  precision: fp32\n  lr: 2.0e-2\n  max_steps: 30\n  micro_batch_size: 8\n  warmup_ratio: 0.0\n")
    train(load_recipe(recipe), "fixed", run_dir=folder / "run")
    return folder / "run"


def test_compare_base_shows_a_large_positive_delta_for_a_trained_fixed_answer(fixed_answer_run, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(fixed_answer_run), "--compare", "base", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())["metrics"]
    assert report["accuracy"]["tuned"][0] == 1.0  # 'Yes' now scores highest on every held-out example
    assert report["accuracy"]["base"][0] == 0.0 and report["accuracy"]["delta"][:2] == [1.0, 1.0]  # large, certain Δ
    assert report["loss"]["delta"][2] < -0.2  # the whole interval well below zero (-0.2999 on an AVX2 CPU, fp32)
    samples = [json.loads(l) for l in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(s["tuned"]["output"] == "Yes" for s in samples)
    assert "| accuracy | 12 |" in (tmp_path / "e" / "eval.md").read_text()


def test_untrained_adapter_gives_exactly_zero_delta(fixed_answer_run, tmp_path):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "untrained"
    shutil.copytree(fixed_answer_run, run)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                           LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))  # B = 0
    shutil.rmtree(run / "adapter")
    fresh.save_pretrained(run / "adapter")
    result = CliRunner().invoke(app, ["eval", str(run), "--compare", "base", "--no-generate", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    loss = json.loads((tmp_path / "e" / "eval.json").read_text())["metrics"]["loss"]
    assert loss["delta"] == [0.0, 0.0, 0.0] and loss["tuned"] == loss["base"]


def test_plain_model_folder_with_a_recipe_for_data(tiny_model_dir, tiny_recipe, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--data", str(tiny_recipe), "--limit", "3",
                                      "--max-new-tokens", "4", "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert report["examples"] == 3 and set(report["metrics"]) >= {"loss", "perplexity", "exact_match", "f1", "rouge_l"}
    assert "loss (n=3)" in result.output and "fewer than 30 examples, so the 95% intervals are unreliable" in result.output
    assert any("intervals are unreliable" in warning for warning in report["warnings"])
    assert "Warning: loss (n=3)" in (tmp_path / "e" / "eval.md").read_text()
    no_data = CliRunner().invoke(app, ["eval", str(tiny_model_dir)])
    assert no_data.exit_code == 2 and "--data is required" in no_data.output
    compare = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--data", str(tiny_recipe), "--compare", "base"])
    assert compare.exit_code == 2 and "needs a run directory" in compare.output


def test_eval_warns_when_eval_data_overlaps_training(fixed_answer_run, tmp_path):
    train_file = fixed_answer_run.parent / "train.jsonl"
    result = CliRunner().invoke(app, ["eval", str(fixed_answer_run), "--data", str(train_file), "--limit", "5",
                                      "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "5 of 5 evaluation examples also occur in this run's training data" in result.output


def test_chat_streams_answers_and_compares_base(fixed_answer_run):
    result = CliRunner().invoke(app, ["chat", str(fixed_answer_run), "--compare", "base", "--max-new-tokens", "3"],
                                input="Statement number 3 about a contract clause.\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.index("base>") < result.output.index("tuned>")
    assert result.output.count("you>") == 2  # one turn, then the empty line ends the chat
    plain = CliRunner().invoke(app, ["chat", str(fixed_answer_run.parent / "run"), "--max-new-tokens", "2"], input="hi\n/exit\n")
    assert plain.exit_code == 0 and "tuned>" in plain.output and "base>" not in plain.output
    # the banner names what is talked to: the run, its base and adapter, the template, the system message
    assert f"run {fixed_answer_run.parent / 'run'}: base " in plain.output and "+ its adapter" in plain.output
    assert "chat template from " in plain.output and "no system message" in plain.output
    told = CliRunner().invoke(app, ["chat", str(fixed_answer_run), "--system", "Be brief.", "--max-new-tokens", "1"],
                              input="/exit\n")
    assert "system message 'Be brief.' (--system)" in told.output


def test_default_eval_data_is_the_runs_own_held_out_split(tiny_recipe, tmp_path):
    """With eval_fraction, eval must hold out the same documents as training did (the run's seed)."""
    from llamatune.evaluate.scoring import eval_examples
    from llamatune.evaluate.target import load_target

    recipe = load_recipe(tiny_recipe, ["data.eval=null", "data.eval_fraction=0.25", "train.seed=11", "train.max_steps=1"])
    result = train(recipe, "t", run_dir=tmp_path / "run")
    examples, _ = eval_examples(load_target(tmp_path / "run"), [], None)
    manifest = json.loads((tmp_path / "run" / "data_manifest.json").read_text())
    assert len(examples) == manifest["totals"]["eval_examples"] == result.summary["data"]["eval_examples"]
    from llamatune.data.pipeline import build_datasets

    held = build_datasets(recipe.data.model_copy(update={"packing": False}), load_target(tmp_path / "run").tokenizer, 11).eval
    assert [e.input_ids for e in examples] == [row[0].input_ids for row in held]


# One small data set per format: (rows, the source's YAML keys). Held-out text documents are one window each, so
# their only window has no prompt at all (the case that crashed generation).
_FORMATS = {
    "instruction": (lambda i: {"q": f"What is item {i}?", "a": f"Item {i} is {CORPUS[i % 5][:30]}"},
                    "prompt: '{q}'\n    response: '{a}'"),
    "chat": (lambda i: {"messages": [{"role": "user", "content": f"Tell me fact {i}."},
                                     {"role": "assistant", "content": CORPUS[i % 5][:40]}]}, "format: chat"),
    "multiple_choice": (lambda i: {"question": f"Which colour is {i}?", "options": ["red", "blue", "green"], "answer": "B"},
                        "format: multiple_choice\n    prompt: '{question}'"),
    "classification": (lambda i: {"text": f"Clause {i} of the contract.", "label": ["Yes", "No"][i % 2]},
                       "format: classification\n    prompt: '{text}'\n    answer: '{label}'\n    labels: ['Yes', 'No']"),
    "text": (lambda i: {"text": CORPUS[i % 5] if i >= 8 else " ".join(CORPUS * 2)}, "format: text"),
}
TEXT_NOTE = ("generation: 4 of 4 examples are windows of plain text (format text) with no question to answer; they are "
             "scored by answer loss and perplexity only, not by exact match, F1 or ROUGE-L")


def one_step_run(folder, fmt: str, model_dir, train_keys: str = "") -> tuple:
    """(run directory, recipe) of a one-step run on 8 training and 4 held-out records of one format."""
    row, source = _FORMATS[fmt]
    write_jsonl(folder / "train.jsonl", [row(i) for i in range(8)])
    write_jsonl(folder / "eval.jsonl", [row(i) for i in range(8, 12)])
    recipe = folder / "r.yaml"
    recipe.write_text(f"model:\n  path: {model_dir}\nlora:\n  r: 4\ndata:\n  train:\n    path: train.jsonl\n    {source}\n"
                      f"  eval:\n    path: eval.jsonl\n    {source}\n  max_length: 96\n  max_overlap: 1.0\n"
                      f"train:\n  precision: fp32\n  max_steps: 1\n{train_keys}")
    train(load_recipe(recipe), fmt, run_dir=folder / "run")
    return folder / "run", recipe


@pytest.fixture(scope="module", params=list(_FORMATS))
def format_run(request, tmp_path_factory, tiny_model_dir):
    """(format, run directory, recipe) of a one-step run of one format."""
    run, recipe = one_step_run(tmp_path_factory.mktemp(request.param), request.param, tiny_model_dir,
                               "  micro_batch_size: 4\n")
    return request.param, run, recipe


def _eval(target, out, *args):
    result = CliRunner().invoke(app, ["eval", str(target), "--max-new-tokens", "3", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads((out / "eval.json").read_text()), result.output


def test_eval_scores_every_format_with_and_without_generation(format_run, tiny_model_dir, tmp_path):
    fmt, run, recipe = format_run
    choices = fmt in ("multiple_choice", "classification")
    report, output = _eval(run, tmp_path / "g", "--compare", "base")
    metrics = report["metrics"]
    assert report["examples"] == 4 and {"loss", "perplexity"} <= set(metrics) and "ratio" in metrics["perplexity"]
    assert ("accuracy" in metrics) == choices and ("f1" in metrics) == (fmt in ("instruction", "chat"))
    if fmt == "text":  # no question to answer: said in the terminal, eval.json and eval.md
        assert report["notes"] == [TEXT_NOTE] and TEXT_NOTE in output
        assert f"Note: {TEXT_NOTE}." in (tmp_path / "g" / "eval.md").read_text()
        samples = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
        assert all(s["tuned"]["output"] is None and s["prompt"] == "" for s in samples)
    else:
        assert report["notes"] == []
    quiet, _ = _eval(run, tmp_path / "n", "--no-generate", "--limit", "2")
    assert quiet["examples"] == 2 and "f1" not in quiet["metrics"] and quiet["notes"] == []
    # Same data, tokenizer and template as the run's: read from the data cache, which must keep what a window is.
    folder, _ = _eval(tiny_model_dir, tmp_path / "f", "--data", str(recipe), "--limit", "3")
    assert folder["examples"] == 3 and "loss" in folder["metrics"]
    assert folder["notes"] == ([TEXT_NOTE.replace("4 of 4", "3 of 3")] if fmt == "text" else [])


def test_a_text_run_merges_and_its_merged_folder_evaluates(tmp_path, tiny_model_dir):
    """Merge's parity check fed the empty prompt of a text window to the model (a crash); it checks whole windows."""
    run, recipe = one_step_run(tmp_path, "text", tiny_model_dir)
    merged = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["prompts"] == 4
    report, _ = _eval(tmp_path / "m", tmp_path / "e", "--data", str(recipe))
    assert report["notes"] == [TEXT_NOTE] and "loss" in report["metrics"]


def test_an_eval_set_with_nothing_left_names_the_data(fixed_answer_run, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"other": "field"}] * 3)
    result = CliRunner().invoke(app, ["eval", str(fixed_answer_run), "--data", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--data {bad}" in result.output and "field 'label' is in none of the 3 records" in result.output
    assert "the records have: other" in result.output


def test_no_small_sample_warning_from_30_examples_on():
    from llamatune.evaluate.report import small_samples

    assert small_samples({"loss": {"n": 30}, "accuracy": {"n": 120}}) == []
    assert "accuracy (n=29)" in small_samples({"loss": {"n": 30}, "accuracy": {"n": 29}})[0]


# ---- eval that explains: answers, confusion, macro-F1, collapse, scoring rules -----------------------------------

def test_macro_f1_equals_a_hand_computation():
    import numpy as np

    from llamatune.evaluate.classes import macro_f1

    gold, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, 2 gold, 2 predicted -> 0.5; class 1: tp 2, 2 gold, 3 predicted -> 0.8; class 2: never hit -> 0
    assert macro_f1(3, gold, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(4, gold, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # a 4th class nobody uses is left out
    assert macro_f1(2, np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])) == pytest.approx((2 * 2 / 6 + 0) / 2)


def test_breakdown_groups_label_sets_and_pools_own_option_texts_by_position():
    from llamatune.evaluate.classes import breakdown, collapse_warnings

    labels = ("positive", "neutral", "negative")
    sets = [labels] * 10 + [("red", "blue"), ("cat", "dog", "cow"), ()]
    gold = ["positive", "neutral", "negative", "positive", "neutral", "negative", "neutral", "neutral", "positive", "negative"]
    tuned = [{"gold": g, "predicted": "neutral"} for g in gold] + [
        {"gold": "blue", "predicted": "blue"}, {"gold": "cat", "predicted": "cow"}, {"loss_sum": 1.0, "tokens": 2}]
    base = [{"gold": g, "predicted": g} for g in gold] + [
        {"gold": "blue", "predicted": "red"}, {"gold": "cat", "predicted": "cat"}, {"loss_sum": 1.0, "tokens": 2}]
    by_label, by_position = breakdown(sets, tuned, base)
    assert by_label["by"] == "label" and by_label["labels"] == list(labels) and by_label["n"] == 10
    assert by_label["gold"] == {"positive": 3, "neutral": 4, "negative": 3}
    assert by_label["predicted"] == {"tuned": {"positive": 0, "neutral": 10, "negative": 0},
                                     "base": {"positive": 3, "neutral": 4, "negative": 3}}
    assert by_label["confusion"]["tuned"] == [[0, 3, 0], [0, 4, 0], [0, 3, 0]]
    assert by_label["macro_f1"]["base"][0] == 1.0 and by_label["macro_f1"]["tuned"][0] == pytest.approx(2 * 4 / 14 / 3)
    low, high = by_label["macro_f1"]["delta"][1:]
    assert low <= by_label["macro_f1"]["delta"][0] <= high < 0  # paired: the collapse is a certain loss
    assert by_label["collapse"]["tuned"] == {"label": "neutral", "count": 10, "share": 1.0, "gold_share": 0.4}
    assert by_label["collapse"]["base"] is None
    assert by_position["by"] == "option position" and by_position["labels"] == ["option 1", "option 2", "option 3"]
    assert by_position["confusion"]["tuned"] == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]
    [warning] = collapse_warnings([by_label, by_position])
    assert warning.startswith("tuned predicts 'neutral' for 10 of 10 examples (100%; the held-out answers are 'neutral' 40%")


def test_a_collapsed_classifier_shows_its_histogram_confusion_matrix_and_a_warning(fixed_answer_run, tmp_path):
    """Acceptance: an adapter trained to always answer 'Yes', evaluated on held-out clauses that are half 'No'."""
    balanced = write_jsonl(tmp_path / "balanced.jsonl", [{"text": f"A fresh clause {i} to classify.", "label": ["Yes", "No"][i % 2]}
                                                         for i in range(12)])
    result = CliRunner().invoke(app, ["eval", str(fixed_answer_run), "--data", str(balanced), "--compare", "base",
                                      "--out", str(tmp_path / "e")], terminal_width=160)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "answers by label (12 examples)" in out and "confusion matrix, tuned (rows: gold answer, columns: predicted)" in out
    assert "tuned predicts 'Yes' for 12 of 12 examples (100%; the held-out answers are 'Yes' 50% of the time)" in " ".join(out.split())
    assert "scoring: accuracy (classification, multiple choice): every choice is scored" in out
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    [group] = report["answers"]
    assert group["predicted"]["tuned"] == {"Yes": 12, "No": 0} and group["gold"] == {"Yes": 6, "No": 6}
    assert group["confusion"]["tuned"] == [[6, 0], [6, 0]]
    assert report["metrics"]["accuracy"]["tuned"][0] == 0.5 and report["metrics"]["macro_f1"]["tuned"][0] == pytest.approx(1 / 3)
    assert any("may have collapsed onto one label" in w for w in report["warnings"])
    assert any("'<|im_end|>" in rule or "end" in rule for rule in report["scoring"])
    md = (tmp_path / "e" / "eval.md").read_text()
    assert "## Answers by label (12 examples)" in md and "| Yes | 6 (50%) |" in md and "| macro_f1 | 12 |" in md


def test_a_checkpoint_evaluates_like_the_run_it_became(tiny_recipe, tmp_path):
    import shutil

    run = tmp_path / "run"
    train(load_recipe(tiny_recipe, ["train.max_steps=4", "train.save_every=2", "train.keep_last=2"]), "t", run_dir=run)
    last, middle = run / "checkpoints" / "step-00000004", run / "checkpoints" / "step-00000002"
    assert last.is_dir() and middle.is_dir()
    whole, _ = _eval(run, tmp_path / "w", "--no-generate")
    at_end, _ = _eval(last, tmp_path / "c", "--no-generate", "--compare", "base")
    assert at_end["metrics"]["loss"]["tuned"][0] == pytest.approx(whole["metrics"]["loss"]["tuned"][0], rel=1e-6)
    assert at_end["target"] == str(last)
    early, _ = _eval(middle, tmp_path / "m", "--no-generate")
    assert early["metrics"]["loss"]["tuned"][0] != pytest.approx(whole["metrics"]["loss"]["tuned"][0], rel=1e-6)
    # a stopped run has no tokenizer/ or adapter/ yet: the checkpoint alone is enough, and its report lands in RUN/eval
    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    for part in ("tokenizer", "adapter"):
        shutil.rmtree(stopped / part)
    (stopped / "summary.json").unlink()
    result = CliRunner().invoke(app, ["eval", str(stopped / "checkpoints" / "step-00000004"), "--no-generate"])
    assert result.exit_code == 0, result.output
    report = json.loads((stopped / "eval" / "step-00000004" / "eval.json").read_text())
    assert report["metrics"]["loss"]["tuned"][0] == pytest.approx(whole["metrics"]["loss"]["tuned"][0], rel=1e-6)
    # a damaged checkpoint is named, not half-loaded
    (stopped / "checkpoints" / "step-00000002" / "adapter.safetensors").write_bytes(b"broken")
    bad = CliRunner().invoke(app, ["eval", str(stopped / "checkpoints" / "step-00000002")])
    assert bad.exit_code != 0 and "adapter.safetensors does not match its checksum" in bad.output
    assert "Traceback" not in bad.output


def test_an_eval_only_recipe_feeds_eval_and_data_check_but_not_train(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "held.jsonl", [{"q": f"What is item {i}?", "a": f"Item {i} is {CORPUS[i % 5][:30]}"} for i in range(5)])
    recipe = tmp_path / "evalonly.yaml"
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  eval:\n    path: held.jsonl\n"
                      "    prompt: '{q}'\n    response: '{a}'\n")
    report, _ = _eval(tiny_model_dir, tmp_path / "e", "--data", str(recipe))
    assert report["examples"] == 5
    check = CliRunner().invoke(app, ["data", "check", str(recipe)])
    assert check.exit_code == 0, check.output
    assert "0 train / 5 held-out examples" in check.output
    preview = CliRunner().invoke(app, ["data", "preview", str(recipe), "-n", "1"])
    assert preview.exit_code == 0 and "held-out example 1 of 5" in preview.output, preview.output
    for command in ("train", "validate"):
        refused = CliRunner().invoke(app, [command, str(recipe)])
        assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
        assert "data.train" in refused.output and "this recipe has only held-out data" in " ".join(refused.output.split())
    recipe.write_text(f"model:\n  path: {tiny_model_dir}\ndata:\n  train: []\n")
    empty = CliRunner().invoke(app, ["validate", str(recipe)])
    assert empty.exit_code == 2 and "no sources: name at least one training file" in " ".join(empty.output.split())
