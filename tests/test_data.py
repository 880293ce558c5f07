"""Data path: completion-only labels, file:line errors, held-out split, batching."""

import pytest

from conftest import qa_rows, write_jsonl
from llamatune.data import build_datasets
from llamatune.data.batches import collate, epoch_order
from llamatune.data.encode import IGNORE_INDEX, encode
from llamatune.errors import RecipeError
from llamatune.model import load_tokenizer
from llamatune.recipe import DataSpec


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


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


def test_bad_lines_are_named_with_file_line_and_fix(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{not json}\n{"question": "q", "answr": "a"}\n{"question": "q", "answer": 3}\n')
    with pytest.raises(RecipeError) as info:
        build_datasets(DataSpec(train=path, prompt_field="question", response_field="answer"), tokenizer, seed=0)
    found = info.value.problems
    assert found[0].startswith(f"{path}:2: not valid JSON")
    assert found[1] == f"{path}:3: no key 'answer' (data.response_field); set data.response_field: answr"
    assert found[2].startswith(f"{path}:4: 'answer' must be a non-empty string")


def test_held_out_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", qa_rows(20))
    spec = DataSpec(train=path, eval_fraction=0.25, prompt_field="question", response_field="answer")
    a, b = build_datasets(spec, tokenizer, seed=1), build_datasets(spec, tokenizer, seed=1)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert a.eval == b.eval
    assert not set(a.eval) & set(a.train)
    assert build_datasets(spec, tokenizer, seed=2).eval != a.eval


def test_too_long_examples_are_dropped_and_counted(tmp_path, tokenizer):
    rows = qa_rows(4) + [{"question": "long " * 200, "answer": "x"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    spec = DataSpec(train=path, eval=path, prompt_field="question", response_field="answer", max_length=64)
    data = build_datasets(spec, tokenizer, seed=0)
    assert data.stats["dropped_too_long"] == {"train": 1, "eval": 1} and len(data.train) == 4


def test_epoch_order_covers_every_example_and_balances_processes():
    single = epoch_order(10, 4, seed=3, epoch=0)
    assert sorted(i for b in single for i in b) == list(range(10)) and [len(b) for b in single] == [4, 4, 2]
    assert epoch_order(10, 4, seed=3, epoch=1) != single
    multi = epoch_order(10, 3, seed=3, epoch=0, world_size=2)
    assert len(multi) % 2 == 0 and all(len(b) == 3 for b in multi)


def test_collate_pads_right_and_masks(tokenizer):
    short, long = encode(tokenizer, "a", "b"), encode(tokenizer, "a longer question", "a longer answer")
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0, n:].sum() == 0 and (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_pad_equal_to_end_of_turn_is_still_trained(tiny_model_dir):
    """Many chat tokenizers (SmolLM2 among them) pad with their end-of-turn token: the mask, not
    the pad id, decides what is ignored, so the answer's final end-of-turn keeps its label."""
    tok = load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.eos_token
    short, long = encode(tok, "a", "b"), encode(tok, "a longer question", "a much longer answer")
    batch = collate([short, long], pad_id=tok.pad_token_id)
    labels = batch["labels"][0].tolist()
    assert labels.count(tok.eos_token_id) == 1  # the real one, not the padding after it
    assert batch["input_ids"][0].tolist().count(tok.eos_token_id) > 1
