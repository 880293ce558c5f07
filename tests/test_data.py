"""Data pipeline: completion-only labels, splits by document, dedup, overlap, length policy, manifest."""

import json

import pytest

from conftest import qa_rows, write_jsonl
from llamatune.data.batches import collate, epoch_order, unpacked
from llamatune.data.encode import IGNORE_INDEX, encode, encode_document
from llamatune.data.pipeline import build_datasets
from llamatune.errors import RecipeError
from llamatune.model import load_tokenizer
from llamatune.schema import DataSpec

QA = {"prompt": "{question}", "response": "{answer}"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def spec(tmp_path, train, eval=None, **kw) -> DataSpec:
    kw.setdefault("packing", False)  # these tests look at one example per row
    return DataSpec(train=[{"path": str(train), **QA}], eval=[{"path": str(eval), **QA}] if eval else None, **kw)


def test_labels_mask_prompt_and_keep_end_of_turn(tokenizer):
    ex = encode(tokenizer, "What is a fever?", "A high temperature.", system_prompt="Be brief.")
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fever?"}],
        tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert all(t == IGNORE_INDEX for t in ex.labels[:n_prompt])
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:])
    trained = tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert trained == "A high temperature.<|im_end|>\n"
    assert tokenizer.eos_token_id in ex.labels  # the model learns to stop
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_equal_to_end_of_turn_is_still_trained(tiny_model_dir):
    """Many chat tokenizers (SmolLM2 among them) pad with their end-of-turn token: the mask, not
    the pad id, decides what is ignored, so the answer's final end-of-turn keeps its label."""
    tok = load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.eos_token
    short, long = encode(tok, "a", "b"), encode(tok, "a longer question", "a much longer answer")
    batch = collate(unpacked([short, long]), pad_id=tok.pad_token_id)
    assert batch["labels"][0].tolist().count(tok.eos_token_id) == 1  # the real one, not the padding
    assert batch["input_ids"][0].tolist().count(tok.eos_token_id) > 1


def test_text_windows_lose_no_token_and_count_none_twice(tokenizer):
    text = " ".join(f"word{i}" for i in range(300))
    ids = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None) + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for overlap in (0, 5):
        windows = encode_document(tokenizer, text, max_length=64, overlap=overlap)
        assert all(len(w.input_ids) <= 64 for w in windows) and len(windows) > 3
        # every token except the very first is a target exactly once (position 0 of a window never is)
        trained = [t for w in windows for t in w.labels[1:] if t != IGNORE_INDEX]
        assert trained == ids[1:]


def test_held_out_fraction_splits_by_document(tmp_path, tokenizer):
    docs = [{"id": f"d{i}", "questions": [{"q": f"Question {i}.{j} about topic {i}?", "a": f"Answer {i}.{j}."} for j in range(3)]}
            for i in range(10)]
    path = tmp_path / "docs.json"
    path.write_text(json.dumps(docs))
    source = {"path": str(path), "explode": "questions", "prompt": "{questions.q}", "response": "{questions.a}"}
    data_spec = DataSpec(train=[source], eval_fraction=0.2, packing=False)
    a, b = build_datasets(data_spec, tokenizer, seed=1), build_datasets(data_spec, tokenizer, seed=1)
    assert (a.manifest["totals"]["train_examples"], a.manifest["totals"]["eval_examples"]) == (24, 6)
    assert a.eval == b.eval  # seeded
    held_docs = {tokenizer.decode(r[0].input_ids).split("Question ")[1].split(".")[0] for r in a.eval}
    train_docs = {tokenizer.decode(r[0].input_ids).split("Question ")[1].split(".")[0] for r in a.train}
    assert len(held_docs) == 2 and not held_docs & train_docs  # whole documents on one side
    assert build_datasets(data_spec, tokenizer, seed=2).eval != a.eval


def test_length_policy_drop_truncate_error(tmp_path, tokenizer):
    rows = qa_rows(4) + [{"question": "long " * 200, "answer": "x"}, {"question": "short", "answer": "long " * 200}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(RecipeError, match=r"t.jsonl \(data.train.0\): 2 of 6 records dropped \(33.3%\), more than "
                                          r"data.max_drop_fraction=0.05: too_long 2 \(e.g. .*t.jsonl:5: "):
        build_datasets(spec(tmp_path, path, path, max_length=64, max_overlap=1.0), tokenizer, seed=0)
    data = build_datasets(spec(tmp_path, path, path, max_length=64, max_overlap=1.0, max_drop_fraction=0.5), tokenizer, seed=0)
    assert data.manifest["length"] == {"train": {"too_long": 2}, "eval": {"too_long": 2}} and len(data.train) == 4
    data = build_datasets(spec(tmp_path, path, path, max_length=64, max_overlap=1.0, length_policy="truncate",
                               max_drop_fraction=0.5), tokenizer, seed=0)
    # the long answer is cut to fit; the long prompt leaves nothing to learn and is still dropped
    assert data.manifest["length"]["train"] == {"truncated": 1, "too_long": 1}
    assert max(len(r[0].input_ids) for r in data.train) == 64
    with pytest.raises(RecipeError, match=r"t.jsonl:5: [\d,]+ (tokens, over|characters, more than) data.max_length=64"):
        build_datasets(spec(tmp_path, path, path, max_length=64, max_overlap=1.0, length_policy="error"), tokenizer, seed=0)


def test_duplicates_removed_and_overlap_fails_above_threshold(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(10) + qa_rows(2))  # 2 exact duplicates
    held = qa_rows(3, offset=100) + [
        dict(qa_rows(1)[0], question=qa_rows(1)[0]["question"].upper() + "  "),  # same after normalization
    ]
    held_path = write_jsonl(tmp_path / "held.jsonl", held)
    with pytest.raises(RecipeError, match="1 held-out examples duplicate training examples exactly"):
        build_datasets(spec(tmp_path, train, held_path), tokenizer, seed=0)
    data = build_datasets(spec(tmp_path, train, held_path, max_overlap=0.5), tokenizer, seed=0)
    assert data.manifest["duplicates_removed"] == {"train": 2, "eval": 0}
    assert data.manifest["overlap"]["exact"] == 1 and data.manifest["overlap"]["examples"] == [f"{held_path}:4"]


def test_near_duplicate_overlap_is_detected(tmp_path, tokenizer):
    long_q = "what are the common early warning signs of a stroke in an older adult and what should a caregiver do"
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "Context: " + long_q + " today", "answer": "Act fast."}] + qa_rows(5))
    held = write_jsonl(tmp_path / "held.jsonl", [{"question": long_q, "answer": "Call emergency services."}] + qa_rows(3, offset=50))
    data = build_datasets(spec(tmp_path, train, held, max_overlap=0.5), tokenizer, seed=0)
    assert data.manifest["overlap"]["near"] == 1 and data.manifest["overlap"]["exact"] == 0
    assert "1 held-out examples (25.0%) duplicate training examples (exact 0, near 1)" in data.manifest["warnings"][0]


def test_manifest_records_sources_hashes_and_drops(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", qa_rows(6) + [{"question": "no answer here"}])
    data = build_datasets(spec(tmp_path, path, eval_fraction=0.3, max_drop_fraction=0.2), tokenizer, seed=0)
    source = data.manifest["sources"][0]
    import hashlib

    assert source["files"] == [{"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}]
    dropped = [s["dropped"] for s in data.manifest["sources"]]
    assert sum(d.get("missing_field", 0) for d in dropped) == 1
    assert any("t.jsonl:7: no field 'answer'" in e for s in data.manifest["sources"] for shown in s["drop_examples"].values()
               for e in shown)
    with pytest.raises(RecipeError, match=r"t.jsonl:7: no field 'answer'.*data.strict is on"):
        build_datasets(spec(tmp_path, path, eval_fraction=0.3, strict=True), tokenizer, seed=0)


def test_epoch_order_covers_every_row_and_balances_processes():
    single = epoch_order(10, 4, seed=3, epoch=0)
    assert sorted(i for b in single for i in b) == list(range(10)) and [len(b) for b in single] == [4, 4, 2]
    assert epoch_order(10, 4, seed=3, epoch=1) != single
    multi = epoch_order(10, 3, seed=3, epoch=0, world_size=2)
    assert len(multi) % 2 == 0 and all(len(b) == 3 for b in multi)


def test_length_grouped_order_covers_every_row_once_with_less_padding():
    import random

    lengths = [random.Random(i).randint(10, 500) for i in range(1000)]
    plain, grouped = epoch_order(1000, 4, seed=1, epoch=0), epoch_order(1000, 4, seed=1, epoch=0, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    padding = lambda order: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)  # noqa: E731
    assert padding(grouped) < 0.1 * padding(plain)
    assert grouped == epoch_order(1000, 4, seed=1, epoch=0, lengths=lengths) != epoch_order(1000, 4, 1, 1, lengths=lengths)
    assert len({len(b) for b in epoch_order(1000, 3, 1, 0, world_size=2, lengths=lengths)}) == 1  # no process waits


def test_duplicates_are_removed_before_the_held_out_split(tmp_path, tokenizer):
    """Regression (LegalBench overruling has 890 repeated rows): copies of one record must not land
    on both sides of a fraction split and then fail the overlap check."""
    rows = qa_rows(20)
    path = write_jsonl(tmp_path / "t.jsonl", rows + rows + rows)
    data = build_datasets(spec(tmp_path, path, eval_fraction=0.25), tokenizer, seed=0)
    assert data.manifest["duplicates_removed"]["train"] == 40 and data.manifest["overlap"]["exact"] == 0
    assert (data.manifest["totals"]["train_examples"], data.manifest["totals"]["eval_examples"]) == (15, 5)


def test_source_weights_repeat_and_subsample(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(10, offset=50))
    held = write_jsonl(tmp_path / "h.jsonl", qa_rows(2, offset=200))
    data_spec = DataSpec(train=[{"path": str(a), "weight": 2, **QA}, {"path": str(b), "weight": 0.5, **QA}],
                         eval=[{"path": str(held), **QA}])
    assert build_datasets(data_spec, tokenizer, seed=0).manifest["totals"]["train_examples"] == 25


def test_cache_hits_and_is_invalidated_by_editing_a_source(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))  # its own: this test changes the template
    train = write_jsonl(tmp_path / "t.jsonl", qa_rows(12))
    held = write_jsonl(tmp_path / "h.jsonl", qa_rows(3, offset=40))
    first = build_datasets(spec(tmp_path, train, held), tokenizer, seed=0)
    second = build_datasets(spec(tmp_path, train, held), tokenizer, seed=0)
    assert first.manifest["cache"]["hit"] is False and second.manifest["cache"]["hit"] is True
    assert second.train == first.train and second.eval == first.eval
    assert second.manifest["cache"]["key"] == first.manifest["cache"]["key"]
    write_jsonl(train, qa_rows(12)[:-1] + [{"question": "edited?", "answer": "yes"}])  # same size, new content
    edited = build_datasets(spec(tmp_path, train, held), tokenizer, seed=0)
    assert edited.manifest["cache"]["hit"] is False and edited.manifest["cache"]["key"] != first.manifest["cache"]["key"]
    other_seed = build_datasets(spec(tmp_path, train, held), tokenizer, seed=1)
    assert other_seed.manifest["cache"]["key"] != edited.manifest["cache"]["key"]
    # a different template changes the key too
    chatml_plus = spec(tmp_path, train, held, chat_template="{{ 'Transcript:' }}" + tokenizer.chat_template)
    assert build_datasets(chatml_plus, tokenizer, seed=0).manifest["cache"]["hit"] is False


def test_doctor_flags_a_template_that_never_trains_end_of_turn(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    no_eot = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    train = write_jsonl(tmp_path / "t.jsonl", qa_rows(6))
    held = write_jsonl(tmp_path / "h.jsonl", qa_rows(2, offset=30))
    data = build_datasets(spec(tmp_path, train, held, chat_template=no_eot), tokenizer, seed=0)
    assert data.manifest["doctor"]["train"]["without_trained_end_of_turn"] == 6
    assert "6 examples do not train the end-of-turn token '<|im_end|>'" in data.manifest["warnings"][0]
