"""DPO and ORPO on the training loop: losses and gradients equal TRL's, runs from an SFT adapter, resume after
SIGKILL and two processes give the same adapter, eval compares against the starting adapter."""

import copy
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import llamatune_cli as cli
from conftest import write_jsonl
from llamatune.data.batches import collate
from llamatune.data.encode import encode_pair
from llamatune.data.formats import Turn
from llamatune.model import load_tokenizer
from llamatune.schema import PreferenceSpec
from llamatune.train.objective import Preference
from llamatune.train.preference import pair_logps

PAIRS = [("What is a lien?", "A claim on property.", "A fish."),
         ("Define tort.", "A civil wrong.", "A dessert with many thin layers."),
         ("Is a verbal contract binding?", "Often, with exceptions.", "Never.")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def start_model(tiny_model_dir):
    """A LoRA model whose B matrices are random (init_lora_weights=False): a started adapter, not the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                           init_lora_weights=False))


def encoded_pairs(tokenizer):
    out = []
    for q, good, bad in PAIRS:
        prompt = (Turn("user", q),)
        out.append(encode_pair(tokenizer, prompt + (Turn("assistant", good),), prompt + (Turn("assistant", bad),)))
    return out


def move(model):
    """The same step away from the start for every copy: the policy then differs from the reference."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B.default" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def adapter_grads(model) -> dict:
    return {n.replace("base_model.model.", ""): p.grad for n, p in model.named_parameters()
            if p.grad is not None and ".default." in n}


def assert_grads_equal(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("loss, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.7)])
def test_dpo_loss_and_adapter_gradients_equal_trls_dpo_trainer(loss, sft_weight, start_model, tokenizer, tmp_path):
    """TRL's own DPOTrainer.compute_loss on TRL's collator, against our tree batch, one forward per pair.

    TRL given a peft model that already has an adapter keeps a frozen copy of it as the reference ("ref"): the
    same reference as ours with reference: adapter_start, the log-probs of the model before it moved.
    preference.sft_weight w is TRL's loss_type [sigmoid, sft] with loss_weights [1, w] (RPO): the chosen answers'
    next-token loss averaged over their tokens."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = encoded_pairs(tokenizer)
    ours, theirs = copy.deepcopy(start_model), copy.deepcopy(start_model)
    mix = dict(loss_type=[loss, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(loss_type=[loss])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, **mix, report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(pairs), bf16=False, max_length=None)
    trainer = DPOTrainer(model=theirs, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    inputs = trainer.data_collator([{"prompt_ids": list(e.input_ids[: e.branch]), "chosen_ids": list(e.input_ids[e.branch:]),
                                     "rejected_ids": list(e.rejected_ids)} for e in pairs])
    batch = collate([[pairs[0], pairs[1]], [pairs[2]]], tokenizer.pad_token_id)  # two pairs packed in one row
    with torch.no_grad():
        reference, _ = pair_logps(ours, batch)
    move(trainer.model), move(ours)
    trainer.model.train(), ours.train()
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()
    batch["ref_logps"] = reference
    terms = Preference("dpo", PreferenceSpec(loss=loss, beta=0.1, sft_weight=sft_weight)).terms(ours, batch)
    assert terms.counts[-1] == len(pairs)
    got = (terms.sums / terms.counts).sum()  # each term over its own count (chosen tokens, pairs), as the loop does
    got.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    assert float(want) != pytest.approx(0.6931, abs=1e-3) or loss != "sigmoid"  # the policy really moved
    assert_grads_equal(adapter_grads(ours), adapter_grads(trainer.model))


def test_orpo_loss_and_gradients_equal_trls_odds_ratio_on_plain_forwards(start_model, tokenizer):
    """TRL's ORPOTrainer.odds_ratio_loss and get_batch_logps (average log-probs) on one plain forward per sequence.

    The next-token term is over the chosen answer's tokens (the ORPO paper's L_SFT of y given x); TRL's ORPOTrainer
    also scores the prompt tokens there, so that part is the paper's, written in plain torch below."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    lam = 0.25
    pairs = encoded_pairs(tokenizer)
    ours, theirs = copy.deepcopy(start_model), copy.deepcopy(start_model)
    move(ours), move(theirs)
    chosen_logps, rejected_logps, nll_sum, nll_tokens = [], [], 0.0, 0
    for e in pairs:
        for side, ids, labels in ((0, e.input_ids, e.labels),
                                  (1, e.input_ids[: e.branch] + e.rejected_ids, (-100,) * e.branch + e.rejected_labels)):
            ids, labels = torch.tensor([ids]), torch.tensor([labels])
            logits = theirs(input_ids=ids).logits.float()
            (chosen_logps if side == 0 else rejected_logps).append(
                ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True))
            if side == 0:
                nll_sum = nll_sum + F.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")
                nll_tokens += int((labels[0, 1:] != -100).sum())
    owner = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    odds, *_ = ORPOTrainer.odds_ratio_loss(owner, torch.cat(chosen_logps), torch.cat(rejected_logps))
    want = nll_sum / nll_tokens - odds.mean()
    want.backward()
    batch = collate([[pairs[0], pairs[1]], [pairs[2]]], tokenizer.pad_token_id)
    objective = Preference("orpo", PreferenceSpec(orpo_lambda=lam))
    terms = objective.terms(ours, batch)
    counts = objective.counts(batch)
    got = (terms.sums / counts).sum()
    got.backward()
    assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    assert_grads_equal(adapter_grads(ours), adapter_grads(theirs))


# ---- runs -------------------------------------------------------------------------------------------------------

def preference_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"question": f"Is remedy {i} safe for a child?", "chosen": f"Ask a clinician first; remedy {i} is not tested.",
             "rejected": f"Yes, remedy {i} is always safe."} for i in range(offset, offset + n)]


def write_runs_folder(folder: Path, model_dir: Path) -> tuple[Path, Path]:
    """An SFT recipe (chosen answers as responses) and a DPO recipe starting from its run, on 24 + 8 pairs."""
    write_jsonl(folder / "train.jsonl", preference_rows(24))
    write_jsonl(folder / "eval.jsonl", preference_rows(8, offset=100))
    common = f"model:\n  path: {model_dir}\nlora:\n  r: 4\n  dropout: 0.0\n"
    sft = folder / "sft.yaml"
    sft.write_text(common + "data:\n  train:\n    path: train.jsonl\n    prompt: '{question}'\n    response: '{chosen}'\n"
                   "  eval:\n    path: eval.jsonl\n    prompt: '{question}'\n    response: '{chosen}'\n"
                   "train:\n  lr: 1.0e-2\n  max_steps: 3\n  precision: fp32\n")
    dpo = folder / "dpo.yaml"
    dpo.write_text(common.replace("  path:", "  adapter: sft-run\n  path:", 1)
                   + "data:\n  train:\n    path: train.jsonl\n    format: preference\n    prompt: '{question}'\n"
                   "  eval:\n    path: eval.jsonl\n    format: preference\n    prompt: '{question}'\n  packing: false\n"
                   "train:\n  method: dpo\n  lr: 1.0e-2\n  seed: 3\n  epochs: 2\n  micro_batch_size: 2\n  grad_accum: 2\n"
                   "  warmup_ratio: 0.2\n  save_every: 1\n  precision: fp32\n  eval_every: 4\n"
                   "preference:\n  beta: 0.5\n  reference: adapter_start\n")
    return sft, dpo


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, tiny_model_dir):
    """The SFT run, and the uninterrupted DPO run from it (subprocesses, like the killed and resumed halves)."""
    folder = tmp_path_factory.mktemp("dpo")
    sft, dpo = write_runs_folder(folder, tiny_model_dir)
    for recipe, run in ((sft, "sft-run"), (dpo, "dpo-run")):
        result = cli("train", str(recipe), "--run-dir", str(folder / run))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # the step statistics are read off detached tensors: torch warned on every step when they were not
        assert "requires_grad=True to a scalar" not in result.stdout + result.stderr
    return folder, dpo


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_from_an_sft_run_raises_held_out_reward_accuracy_and_leaves_a_complete_run(dpo_runs):
    folder, _ = dpo_runs
    run = folder / "dpo-run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["steps"] == 12
    assert summary["eval_stats_before"]["reward_accuracy"] == 0.0  # the reference is the start: no margin yet
    assert summary["eval_stats_after"]["reward_accuracy"] == 1.0 and summary["eval_stats_after"]["reward_margin"] > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"] == pytest.approx(0.6931, abs=1e-4)
    steps = [m for m in metrics(run) if "loss" in m]
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= steps[-1].keys()
    assert (run / "reference_logps.pt").is_file() and (run / "loss.png").is_file()
    # the adapter started from the SFT run's (not from zero): step 0's chosen log-probs are the SFT model's
    merged = cli("merge", str(run))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    result = cli("eval", str(run), "--compare", "start", "--no-generate", "--out", str(folder / "ev"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((folder / "ev" / "eval.json").read_text())
    assert report["compare"] == "start"
    assert report["metrics"]["preference_margin"]["delta"][1] > 0  # the paired interval is above 0
    assert "Δ tuned − start" in result.stdout


def test_dpo_sigkill_then_resume_is_exact(dpo_runs, tmp_path):
    folder, dpo = dpo_runs
    shutil.copytree(folder / "sft-run", tmp_path / "sft-run")
    recipe = tmp_path / "dpo.yaml"
    shutil.copy(dpo, recipe)
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(folder / name, tmp_path / name)
    killed = cli("train", str(recipe), "--run-dir", str(tmp_path / "run"), fault="step:5")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resumed = cli("train", str(recipe), "--run-dir", str(tmp_path / "run"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    got = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    want = load_file(folder / "dpo-run" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    last = lambda run: {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}  # noqa: E731
    assert last(tmp_path / "run") == last(folder / "dpo-run")


def test_dpo_on_two_processes_equals_one(dpo_runs, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    folder, dpo = dpo_runs
    settings = ["--set", "train.epochs=null", "--set", "train.max_steps=3", "--set", "train.save_every=null"]
    two = cli("train", str(dpo), "--run-dir", str(tmp_path / "two"), *settings, "--set", "train.micro_batch_size=1",
              nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = cli("train", str(dpo), "--run-dir", str(tmp_path / "one"), *settings)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "x 2 proc" in two.stdout
    got = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_model_adapter_that_does_not_fit_is_refused_before_loading(dpo_runs, tmp_path):
    folder, dpo = dpo_runs
    result = cli("train", str(dpo), "--run-dir", str(tmp_path / "r"), "--set", "lora.r=8")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "lora.r (--set): 8 here, 4 in" in result.stderr and "set lora.r: 4" in result.stderr
    result = cli("train", str(dpo), "--run-dir", str(tmp_path / "r"), "--set", f"model.adapter={tmp_path}")
    assert result.returncode == 2 and "not a complete run directory" in result.stderr, result.stderr
