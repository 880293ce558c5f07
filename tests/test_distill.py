"""train.method: distill: the grouped top-k divergences against the full-vocabulary ones, the teacher pass (cached
once, resumed by shard), depth pruning, the extra trainable modules, the recipe checks, and a distillation run
from a tiny SFT teacher into a pruned student that merges and evaluates three ways."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import llamatune_cli as cli
from conftest import qa_rows, write_jsonl
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.train.distill import _LinearDistill, divergence, grouped_log_probs, token_terms

LOSSES = ("forward_kl", "reverse_kl", "jsd")


def full_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, loss: str, t: float) -> torch.Tensor:
    """The divergence over the whole vocabulary, computed directly from both models' logits."""
    p, q = F.log_softmax(teacher_logits / t, -1), F.log_softmax(student_logits / t, -1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731  KL(a || b) of log-probs
    if loss == "forward_kl":
        return kl(p, q) * t**2
    if loss == "reverse_kl":
        return kl(q, p) * t**2
    m = torch.logaddexp(p, q) - torch.log(torch.tensor(2.0))
    return 0.5 * (kl(p, m) + kl(q, m)) * t**2


def cached_teacher(teacher_logits: torch.Tensor, k: int, t: float):
    """What the teacher pass stores: top-k tokens and grouped log-probs at temperature t."""
    top = (teacher_logits / t).topk(k, -1).indices
    return top, grouped_log_probs(teacher_logits.float() / t, top)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_grouped_top_k_equals_the_full_vocabulary_divergence_when_k_is_the_vocabulary(loss, temperature):
    torch.manual_seed(0)
    vocab, n = 50, 12
    teacher, student = torch.randn(n, vocab) * 3, (torch.randn(n, vocab) * 3).requires_grad_()
    top, logp = cached_teacher(teacher, vocab, temperature)
    ours = divergence(logp, grouped_log_probs(student / temperature, top), loss) * temperature**2
    want = full_divergence(teacher, student, loss, temperature)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), student)
    (g_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g_ours, g_want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_grouped_top_k_is_a_lower_bound_that_tightens_with_k(loss):
    torch.manual_seed(1)
    vocab, n = 200, 16
    teacher, student = torch.randn(n, vocab) * 2, torch.randn(n, vocab) * 2
    full = full_divergence(teacher, student, loss, 1.0)
    previous = torch.zeros(n)
    for k in (1, 4, 32, 199, 200):
        top, logp = cached_teacher(teacher, k, 1.0)
        got = divergence(logp, grouped_log_probs(student, top), loss)
        assert (got <= full + 1e-5).all() and (got >= -1e-6).all(), k  # grouping never increases a divergence
        if loss == "forward_kl":  # KL's grouped estimate only grows as the groups are split
            assert (got >= previous - 1e-5).all(), k
        previous = got
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_the_chunked_head_gives_the_same_losses_and_gradients_as_the_logits(loss, monkeypatch):
    import llamatune.train.distill as distill

    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 7 * 40)  # several chunks of 7 rows
    torch.manual_seed(2)
    hidden, weight = torch.randn(23, 16, requires_grad=True), torch.randn(40, 16)
    targets = torch.randint(0, 40, (23,))
    top, logp = cached_teacher(torch.randn(23, 40), 5, 1.5)
    mixed, ce, kd, agree = _LinearDistill.apply(hidden, weight, targets, top, logp, 1.5, 0.3, loss)
    want = token_terms(hidden @ weight.t(), targets, top, logp, 1.5, 0.3, loss)
    for got, ref in zip((mixed, ce, kd, agree), want):
        torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad((mixed * torch.arange(23.0)).sum(), hidden)
    (g_want,) = torch.autograd.grad((want[0] * torch.arange(23.0)).sum(), hidden)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, F.cross_entropy(hidden.detach() @ weight.t(), targets, reduction="none"))


# ---- runs -------------------------------------------------------------------------------------------------------

def write_folder(folder: Path, model_dir: Path) -> Path:
    """Data, an SFT recipe for the teacher and a distill recipe (student: the pruned model, written later)."""
    write_jsonl(folder / "train.jsonl", qa_rows(40))
    write_jsonl(folder / "eval.jsonl", qa_rows(8, offset=200))
    data = ("data:\n  train:\n    path: train.jsonl\n    prompt: '{question}'\n    response: '{answer}'\n"
            "  eval:\n    path: eval.jsonl\n    prompt: '{question}'\n    response: '{answer}'\n")
    (folder / "teacher.yaml").write_text(f"model:\n  path: {model_dir}\nlora:\n  r: 8\n  dropout: 0.0\n" + data
                                         + "train:\n  lr: 1.0e-2\n  max_steps: 6\n  precision: fp32\n")
    (folder / "distill.yaml").write_text("model:\n  path: student\nlora:\n  r: 4\n  dropout: 0.0\n" + data
                                         + "train:\n  method: distill\n  lr: 1.0e-2\n  max_steps: 4\n  micro_batch_size: 4\n"
                                         "  precision: fp32\n  save_every: 1\n"
                                         "distill:\n  teacher: teacher-run\n  top_k: 8\n  temperature: 2.0\n  kd_ratio: 0.7\n")
    return folder


@pytest.fixture(scope="module")
def distill_folder(tmp_path_factory, tiny_model_dir):
    """A teacher run (SFT on the tiny model) and the tiny model pruned to one layer as the student."""
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    folder = write_folder(tmp_path_factory.mktemp("distill"), tiny_model_dir)
    train(load_recipe(folder / "teacher.yaml"), "teacher", run_dir=folder / "teacher-run")
    result = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "--keep-layers", "1", "--data",
                                      str(folder / "teacher.yaml"), "--out", str(folder / "student")])
    assert result.exit_code == 0, result.output
    return folder


def test_prune_writes_a_plain_model_without_the_least_influential_layer(distill_folder, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    student = distill_folder / "student"
    report = json.loads((student / "prune_report.json").read_text())
    assert report["layers_before"] == 2 and report["layers_after"] == 1 and len(report["scores"]) == 2
    (removed,) = report["removed"]
    assert report["scores"][removed] == min(report["scores"]) and report["neighbours"] == [0]
    pruned = AutoModelForCausalLM.from_pretrained(student)
    whole = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert pruned.config.num_hidden_layers == 1
    del whole.model.layers[removed]  # the same model, pruned by hand
    whole.config.num_hidden_layers = 1
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    torch.testing.assert_close(pruned(ids, use_cache=False).logits, whole(ids, use_cache=False).logits, rtol=0, atol=1e-6)
    again = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "--keep-layers", "2", "--data",
                                     str(distill_folder / "teacher.yaml"), "--out", str(distill_folder / "x")])
    assert again.exit_code == 2 and "has 2 decoder layers; keep between 1 and 1" in again.output


def test_distill_trains_from_the_cached_teacher_and_a_second_run_reuses_it(distill_folder, tmp_path, monkeypatch):
    from llamatune.recipe import load_recipe
    from llamatune.train import teacher
    from llamatune.train.loop import train

    recipe = load_recipe(distill_folder / "distill.yaml")
    result = train(recipe, "distill", run_dir=tmp_path / "first")
    summary = result.summary
    assert summary["method"] == "distill" and summary["steps"] == 4
    steps = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert {"kd_loss", "ce_loss", "teacher_top1_agreement"} <= [m for m in steps if "loss" in m][-1].keys()
    evals = [m for m in steps if "eval_loss" in m]
    assert evals[-1]["eval_kd_loss"] < evals[0]["eval_kd_loss"]  # the student moved towards the teacher
    shards = list((Path(teacher.cache_dir()) / "teacher").glob("*/train-*.safetensors"))
    assert len(shards) == 1  # 40 rows: one shard of 64

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded again")

    monkeypatch.setattr(teacher, "load_teacher", refuse)
    other = load_recipe(distill_folder / "distill.yaml", ["distill.kd_ratio=0.2", "lora.r=2", "distill.loss=jsd"])
    second = train(other, "distill", run_dir=tmp_path / "second")
    assert second.summary["steps"] == 4
    changed = load_recipe(distill_folder / "distill.yaml", ["distill.top_k=4"])  # another k: another cache entry
    with pytest.raises(AssertionError, match="loaded again"):
        train(changed, "distill", run_dir=tmp_path / "third")


def test_a_killed_teacher_pass_resumes_at_its_first_missing_shard(distill_folder, tmp_path, monkeypatch):
    from llamatune.recipe import load_recipe
    from llamatune.train import teacher
    from llamatune.train.loop import train

    monkeypatch.setattr(teacher, "ROWS_PER_SHARD", 16)  # 40 rows: 3 shards, held-out 8 rows: 1
    recipe = load_recipe(distill_folder / "distill.yaml", ["data.packing=false"])
    train(recipe, "distill", run_dir=tmp_path / "whole")
    folder = next((Path(teacher.cache_dir()) / "teacher").glob("*/complete.json")).parent
    want = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}
    assert len(want) == 4
    (folder / "complete.json").unlink()  # as if killed after its second shard
    (folder / "train-0000032.safetensors").unlink()
    (folder / "eval-0000000.safetensors").unlink()
    computed = []
    real = teacher._top_k
    monkeypatch.setattr(teacher, "_top_k", lambda *a, **k: computed.append(1) or real(*a, **k))
    train(recipe, "distill", run_dir=tmp_path / "again")
    assert len(computed) == 2 + 2  # the two missing shards only: 8 + 8 rows at micro-batch 4
    assert {p.name: p.read_bytes() for p in folder.glob("*.safetensors")} == want


def test_distilled_student_merges_and_evaluates_against_base_and_teacher(distill_folder, tmp_path):
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    run = tmp_path / "run"
    train(load_recipe(distill_folder / "distill.yaml", ["distill.train_extra=norms"]), "distill", run_dir=run)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["norm", "layernorm"]
    runner = CliRunner()
    merged = runner.invoke(app, ["merge", str(run)])
    assert merged.exit_code == 0, merged.output
    result = runner.invoke(app, ["eval", str(run), "--compare", "base", "--compare", "teacher", "--no-generate",
                                 "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["compare"] == ["base", "teacher"]
    assert {"base", "teacher", "tuned"} <= report["metrics"]["loss"].keys()
    table = (tmp_path / "ev" / "eval.md").read_text()
    assert "| metric | n | base | teacher | tuned | Δ tuned − base | Δ tuned − teacher |" in table
    # the same student trained by SFT alone (kd_ratio 0), scored on the same loaded base, paired
    sft = tmp_path / "sft-alone"
    train(load_recipe(distill_folder / "distill.yaml", ["distill.kd_ratio=0"]), "sft", run_dir=sft)
    paired = runner.invoke(app, ["eval", str(run), "--compare", str(sft), "--no-generate", "--out", str(tmp_path / "p")])
    assert paired.exit_code == 0, paired.output
    report = json.loads((tmp_path / "p" / "eval.json").read_text())
    assert report["compare"] == "sft-alone" and "delta" in report["metrics"]["loss"]
    other_base = runner.invoke(app, ["eval", str(run), "--compare", str(distill_folder / "teacher-run"), "--no-generate"])
    assert other_base.exit_code == 2 and "two runs are compared on one base model" in other_base.output


def test_neighbours_trains_the_layers_next_to_the_removed_block_in_full(distill_folder, tmp_path, tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "five")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "five")
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "five"), "--keep-layers", "4", "--data",
                                      str(distill_folder / "teacher.yaml"), "--out", str(tmp_path / "student")])
    assert result.exit_code == 0, result.output
    neighbours = json.loads((tmp_path / "student" / "prune_report.json").read_text())["neighbours"]
    assert 1 <= len(neighbours) <= 2
    trained = train(load_recipe(distill_folder / "distill.yaml", ["distill.train_extra=neighbours", "train.max_steps=1",
                                                                  f"model.path={tmp_path / 'student'}"]),
                    "distill", run_dir=tmp_path / "run")
    trainable = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    for i in range(4):
        full = any(f"layers.{i}.modules_to_save." in n and n.endswith("mlp.down_proj.weight") for n in trainable)
        lora = any(f"layers.{i}." in n and "lora_" in n for n in trainable)
        assert (full, lora) == ((True, False) if i in neighbours else (False, True)), i
    everything = CliRunner().invoke(app, ["validate", str(distill_folder / "distill.yaml"),
                                          "--set", "distill.train_extra=neighbours"])
    assert everything.exit_code == 2 and "would train all 1 layers" in everything.output


def test_recipe_checks_name_the_keys_and_the_fix(distill_folder, tmp_path, tiny_model_dir):
    runner = CliRunner()
    recipe = distill_folder / "distill.yaml"
    no_teacher = runner.invoke(app, ["validate", str(recipe), "--set", "distill.teacher=null"])
    assert no_teacher.exit_code == 2 and "needs distill.teacher" in no_teacher.output
    sft = runner.invoke(app, ["validate", str(recipe), "--set", "train.method=sft"])
    assert sft.exit_code == 2 and "only read by train.method: distill" in sft.output
    missing = runner.invoke(app, ["validate", str(recipe), "--set", f"distill.teacher={tmp_path / 'nope'}"])
    assert missing.exit_code == 2 and "distill.teacher" in missing.output
    neighbours = runner.invoke(app, ["validate", str(recipe), "--set", f"model.path={tiny_model_dir}",
                                     "--set", "distill.train_extra=neighbours"])
    assert neighbours.exit_code == 2 and "no prune_report.json" in neighbours.output
    # a teacher whose tokenizer numbers the tokens differently: named, token by token
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    table = vocab["model"]["vocab"]
    a, b = sorted(table, key=table.get)[10:12]
    table[a], table[b] = table[b], table[a]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    swapped = runner.invoke(app, ["validate", str(recipe), "--set", f"distill.teacher={other}"])
    assert swapped.exit_code == 2 and "2 token ids name different tokens" in swapped.output and repr(a) in swapped.output
    assert "Traceback" not in swapped.output


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_distill_sigkill_then_resume_is_exact(distill_folder, tmp_path):
    import signal

    recipe = str(distill_folder / "distill.yaml")
    whole = cli("train", recipe, "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    killed = cli("train", recipe, "--run-dir", str(tmp_path / "run"), fault="step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resumed = cli("train", recipe, "--run-dir", str(tmp_path / "run"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "read from the cache" in resumed.stdout
    got, want = adapter(tmp_path / "run"), adapter(tmp_path / "whole")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_distill_on_two_processes_equals_one_teacher_pass_included(distill_folder, tmp_path):
    """Unpacked, 80 rows make two teacher shards: each process computes one (in its own cache), and the cache and
    the adapter equal one process's."""
    from safetensors.torch import load_file

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    write_jsonl(tmp_path / "train.jsonl", qa_rows(80))
    shutil.copy(distill_folder / "eval.jsonl", tmp_path / "eval.jsonl")
    recipe = tmp_path / "distill.yaml"
    recipe.write_text((distill_folder / "distill.yaml").read_text()
                      .replace("path: student", f"path: {distill_folder / 'student'}")
                      .replace("teacher: teacher-run", f"teacher: {distill_folder / 'teacher-run'}")
                      .replace("  micro_batch_size: 4\n", "  micro_batch_size: 4\n  seed: 5\n")
                      .replace("  eval:\n", "  packing: false\n  eval:\n", 1))
    settings = ["--set", "train.save_every=null", "--set", "train.max_steps=3"]
    caches = {n: tmp_path / f"cache-{n}" for n in (1, 2)}
    for n, cache in caches.items():
        (cache / "models").mkdir(parents=True)
        extra = ["--set", "train.micro_batch_size=2"] if n == 2 else []
        result = cli("train", str(recipe), "--run-dir", str(tmp_path / f"run-{n}"), *settings, *extra, nproc=n,
                     env={"LLAMATUNE_CACHE_DIR": str(cache)})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = {n: sorted((cache / "teacher").glob("*/*.safetensors")) for n, cache in caches.items()}
    assert [p.name for p in shards[1]] == [p.name for p in shards[2]] == [
        "eval-0000000.safetensors", "train-0000000.safetensors", "train-0000064.safetensors"]
    for one, two in zip(shards[1], shards[2]):
        a, b = load_file(one), load_file(two)
        assert torch.equal(a["top"], b["top"]) and torch.equal(a["counts"], b["counts"])
        torch.testing.assert_close(a["logp"], b["logp"], rtol=0, atol=1e-5)
    got, want = adapter(tmp_path / "run-2"), adapter(tmp_path / "run-1")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_bench_and_plan_take_a_distill_recipe(distill_folder):
    runner = CliRunner()
    benched = runner.invoke(app, ["bench", str(distill_folder / "distill.yaml"), "--steps", "2"])
    assert benched.exit_code == 0, benched.output
    assert "tokens/s" in benched.output
    planned = runner.invoke(app, ["plan", str(distill_folder / "distill.yaml")])
    assert planned.exit_code == 0, planned.output
