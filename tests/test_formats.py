"""Formats: chat (every assistant turn trained), multiple choice, classification, text; explode end to end."""

import json

import pytest

from conftest import write_jsonl
from llamatune.data.encode import IGNORE_INDEX, encode_turns
from llamatune.data.formats import Drop, Turn, chat, classification, multiple_choice
from llamatune.data.pipeline import build_datasets
from llamatune.errors import RecipeError
from llamatune.model import load_tokenizer
from llamatune.schema import DataSpec, SourceSpec


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def trained_text(tokenizer, example):
    """The trained spans, decoded separately and joined with |."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return "|".join(spans)


def test_chat_openai_and_sharegpt_train_every_assistant_turn(tokenizer):
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                           {"role": "assistant", "content": "Goodbye"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                  {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"},
                                  {"from": "human", "value": "unanswered"}]}
    a = chat(SourceSpec(path="x", format="chat"), openai, None, ())
    b = chat(SourceSpec(path="x", format="chat", messages="conversations"), sharegpt, "S", ())
    assert a.turns == b.turns  # same conversation; the trailing unanswered user turn is dropped
    example = encode_turns(tokenizer, a.turns)
    assert trained_text(tokenizer, example) == "Hello<|im_end|>\n|Goodbye<|im_end|>\n"
    # the prompt part of each turn is exactly what inference renders
    full = tokenizer.apply_chat_template([{"role": t.role, "content": t.content} for t in a.turns], tokenize=False)
    assert tokenizer.decode(example.input_ids) == full


def test_chat_unknown_role_names_it_and_role_mapping_fixes_it(tmp_path, tokenizer):
    record = {"messages": [{"from": "patient", "value": "Hi"}, {"from": "doctor", "value": "Hello"}]}
    good = {"messages": [{"role": "user", "value": "Hi"}, {"role": "assistant", "value": "Hello"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"id": "conv-7", **record}])
    with pytest.raises(RecipeError) as info:
        build_datasets(DataSpec(train=[{"path": str(path), "format": "chat"}], eval_fraction=0.5), tokenizer, seed=0)
    assert info.value.problems == [
        f"{path}:2 (record id 'conv-7'): chat role 'patient' in message 0 of 'messages' is unknown; known roles: assistant, bot, gpt, "
        "human, model, system, user. Map it in the source, e.g. roles: {patient: user} (or assistant, system) (data.train.0.roles)"]
    mapped = chat(SourceSpec(path="x", format="chat", roles={"patient": "user", "doctor": "assistant"}), record, None, ())
    assert mapped.turns == (Turn("user", "Hi"), Turn("assistant", "Hello"))


def test_multiple_choice_letters_texts_and_mappings():
    spec = SourceSpec(path="x", format="multiple_choice", prompt="{stem}", options="opts", answer="{key}")
    by_letter = multiple_choice(spec, {"stem": "2+2?", "opts": ["3", "4"], "key": "B"}, None, ())
    by_text = multiple_choice(spec, {"stem": "2+2?", "opts": ["3", "4"], "key": "4"}, None, ())
    assert by_letter == by_text and by_letter.choices == ("A", "B")
    assert by_letter.turns[-2].content == "2+2?\n\nA. 3\nB. 4\n\nAnswer with the letter of the correct option."
    assert by_letter.turns[-1] == Turn("assistant", "B")
    mapping = multiple_choice(spec, {"stem": "s", "opts": {"a": "x", "b": "y"}, "key": "b"}, None, ())
    assert mapping.choices == ("a", "b") and mapping.turns[-1].content == "b"
    with pytest.raises(Drop) as info:
        multiple_choice(spec, {"stem": "s", "opts": ["x"], "key": "Z"}, None, ())
    assert info.value.reason == "label_not_in_set"


def test_classification_keeps_label_set_and_drops_unknown_labels(tmp_path, tokenizer):
    rows = [{"text": f"Statement {i}", "label": "Yes" if i % 2 else "No"} for i in range(8)] + [{"text": "odd", "label": "Maybe"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    source = {"path": str(path), "format": "classification", "prompt": "Hearsay? {text}", "answer": "{label}", "labels": ["Yes", "No"]}
    data = build_datasets(DataSpec(train=[source], eval=[source], max_overlap=1.0, max_drop_fraction=0.2), tokenizer, seed=0)
    entry = data.manifest["sources"][0]
    assert entry["labels"] == ["Yes", "No"] and entry["dropped"] == {"label_not_in_set": 1} and entry["examples"] == 8
    assert all(e.choices == ("Yes", "No") for row in data.eval for e in row)  # kept for evaluation
    rendered = classification(SourceSpec(**source), rows[1], None, ("Yes", "No"))
    assert rendered.turns[-2].content.endswith("Answer with one of: Yes, No.") and rendered.turns[-1].content == "Yes"


def test_text_format_trains_every_token_without_template(tmp_path, tokenizer):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text(" ".join(f"w{i}" for i in range(200)))
    (tmp_path / "notes" / "b.md").write_text("short note")
    data = build_datasets(DataSpec(train=[{"path": str(tmp_path / "notes"), "format": "text"}],
                                   eval=[{"path": str(tmp_path / "notes" / "b.md"), "format": "text"}],
                                   max_length=32, max_overlap=1.0, dedup=False, packing=False), tokenizer, seed=0)
    assert data.manifest["totals"]["train_examples"] > 5
    assert all(len(r[0].input_ids) <= 32 for r in data.train)


def test_tatqa_shape_explode_with_table_and_paragraphs(tmp_path, tokenizer):
    doc = {"table": {"table": [["", "2019", "2018"], ["Revenue", "10", "8"]]},
           "paragraphs": [{"order": 1, "text": "Revenue grew."}],
           "questions": [{"question": "What was 2019 revenue?", "answer": ["10"], "scale": "million"},
                         {"question": "Change from 2018?", "answer": 2, "scale": ""}]}
    path = tmp_path / "tat.json"
    path.write_text(json.dumps([doc, {**doc, "questions": doc["questions"][:1]}]))
    source = {"path": str(path), "explode": "questions",
              "prompt": "{table.table}\n{paragraphs.0.text}\nQ: {questions.question}",
              "response": "{questions.answer|, } {questions.scale?}"}
    data = build_datasets(DataSpec(train=[source], eval=[source], dedup=False, max_overlap=1.0, packing=False), tokenizer, seed=0)
    assert data.manifest["sources"][0]["records"] == 3 and data.manifest["totals"]["train_examples"] == 3
    text = tokenizer.decode(data.train[0][0].input_ids)
    assert " | 2019 | 2018\nRevenue | 10 | 8\nRevenue grew.\nQ: What was 2019 revenue?" in text
    assert "10 million<|im_end|>" in text


def test_multiple_choice_can_train_and_score_the_option_text():
    from llamatune.data.formats import multiple_choice
    from llamatune.schema import SourceSpec

    fields = {"question": "Which organ makes insulin?", "options": ["Liver", "Pancreas", "Spleen"], "answer": "B"}
    spec = SourceSpec(path="x.jsonl", format="multiple_choice", prompt="{question}", answer_with="option")
    rendered = multiple_choice(spec, fields, None, ())
    assert rendered.turns[-1].content == "Pancreas" and rendered.choices == ("Liver", "Pancreas", "Spleen")
    assert "B. Pancreas" in rendered.turns[-2].content and "text of the correct option" in rendered.turns[-2].content
    letters = multiple_choice(spec.model_copy(update={"answer_with": "letter"}), fields, None, ())
    assert letters.turns[-1].content == "B" and letters.choices == ("A", "B", "C")
