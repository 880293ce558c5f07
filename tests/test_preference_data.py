"""format: preference — the three layouts, what is dropped and why, the encoded pair, and the batch tree whose
log-probs must equal two separate forwards."""

import pytest

from conftest import write_jsonl
from llamatune.data.batches import collate
from llamatune.data.encode import IGNORE_INDEX, encode_pair, encode_turns
from llamatune.data.formats import Drop, Turn
from llamatune.data.pairs import preference, transcript_turns
from llamatune.data.pipeline import build_datasets
from llamatune.errors import RecipeError
from llamatune.model import load_tokenizer
from llamatune.schema import DataSpec, Recipe, SourceSpec


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def spec(**keys) -> SourceSpec:
    return SourceSpec(path="x", format="preference", **keys)


def test_fields_layout_text_templates():
    record = {"q": "Is aspirin safe?", "good": "Usually, but ask first.", "bad": "Always, in any dose."}
    got = preference(spec(prompt="{q}", chosen="{good}", rejected="{bad}"), record, "Be careful.")
    assert got.turns == (Turn("system", "Be careful."), Turn("user", "Is aspirin safe?"),
                         Turn("assistant", "Usually, but ask first."))
    assert got.rejected == got.turns[:2] + (Turn("assistant", "Always, in any dose."),)


def test_fields_layout_conversational_messages_as_trl_writes_them():
    record = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Define tort."}],
              "chosen": [{"role": "assistant", "content": "A civil wrong."}],
              "rejected": [{"from": "gpt", "value": "A cake."}]}  # ShareGPT keys are read too
    got = preference(spec(), record, None)
    assert [t.role for t in got.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert got.turns[-1].content == "A civil wrong." and got.rejected[-1].content == "A cake."
    assert got.turns[:-1] == got.rejected[:-1]


def test_shared_prefix_message_lists_and_hh_transcripts_agree():
    lists = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "What is a lien?"}, {"role": "assistant", "content": "A claim on property."}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "What is a lien?"}, {"role": "assistant", "content": "A fruit."}]}
    text = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: What is a lien?\n\nAssistant: A claim on property.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: What is a lien?\n\nAssistant: A fruit."}
    a = preference(spec(pairs="shared_prefix"), lists, None)
    b = preference(spec(pairs="shared_prefix"), text, None)
    assert a == b and len(a.turns) == 4 and a.rejected[-1] == Turn("assistant", "A fruit.")


def test_transcripts_take_mapped_speaker_names_and_refuse_unmarked_text():
    turns = transcript_turns("Patient: It hurts.\n\nDoctor: Where?", {"Patient": "user", "Doctor": "assistant"}, "chosen")
    assert turns == [Turn("user", "It hurts."), Turn("assistant", "Where?")]
    with pytest.raises(Drop) as info:
        transcript_turns("just an answer", {}, "chosen")
    assert info.value.reason == "no_transcript" and "roles:" in str(info.value)
    with pytest.raises(Drop) as info:
        transcript_turns("preamble\n\nHuman: hi", {}, "rejected")
    assert info.value.reason == "no_transcript"


@pytest.mark.parametrize("record, layout, reason", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "fields", "same_answers"),
    ({"chosen": "Human: a\n\nAssistant: b", "rejected": "Human: c\n\nAssistant: b"}, "shared_prefix", "no_shared_prompt"),
    ({"chosen": "Human: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y", "rejected": "Human: a\n\nAssistant: b"},
     "shared_prefix", "no_answer"),
    ({"chosen": "Human: a\n\nAssistant: b\n\nHuman: x\n\nAssistant: y",
      "rejected": "Human: a\n\nAssistant: b\n\nHuman: z\n\nAssistant: y"}, "shared_prefix", "bad_pair"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x", "rejected": "y"},
     "fields", "bad_pair"),
    ({"prompt": "q", "chosen": "x"}, "fields", "missing_field"),
    ({"prompt": "q", "chosen": "x", "rejected": "  "}, "fields", "empty"),
])
def test_pairs_that_cannot_be_compared_are_dropped_by_reason(record, layout, reason):
    with pytest.raises(Drop) as info:
        preference(spec(pairs=layout), record, None)
    assert info.value.reason == reason, info.value


def test_encoded_pair_labels_the_two_answers_only_and_shares_the_prompt(tokenizer):
    chosen = (Turn("user", "Hi"), Turn("assistant", "Hello"), Turn("user", "Define lien."), Turn("assistant", "A claim."))
    rejected = chosen[:3] + (Turn("assistant", "A small fish that swims."),)
    pair = encode_pair(tokenizer, chosen, rejected)
    alone_c, alone_r = encode_turns(tokenizer, chosen), encode_turns(tokenizer, rejected)
    assert pair.input_ids == alone_c.input_ids
    assert pair.input_ids[: pair.branch] + pair.rejected_ids == alone_r.input_ids
    # the earlier assistant turn ("Hello") is context of the prompt, not trained
    assert tokenizer.decode([t for t in pair.labels if t != IGNORE_INDEX]) == "A claim.<|im_end|>\n"
    assert tokenizer.decode([t for t in pair.rejected_labels if t != IGNORE_INDEX]) == "A small fish that swims.<|im_end|>\n"
    assert pair.length == len(alone_c.input_ids) + len(alone_r.input_ids) - pair.branch


def test_a_preference_file_builds_pairs_and_counts_its_drops(tmp_path, tokenizer):
    rows = [{"question": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": f"A wrong answer {i}!"}
            for i in range(30)] + [{"question": "dup?", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = DataSpec(train=[{"path": str(path), "format": "preference", "prompt": "{question}"}], eval_fraction=0.25)
    built = build_datasets(data, tokenizer, seed=0)
    examples = [e for row in built.train + built.eval for e in row]
    assert len(examples) == 30 and all(e.is_pair for e in examples)
    assert built.manifest["sources"][0]["dropped"]["same_answers"] == 1


def test_recipe_method_and_data_must_agree(tmp_path):
    pref = {"path": "p.jsonl", "format": "preference"}
    with pytest.raises(Exception, match="train.method: dpo or orpo"):
        Recipe(data={"train": [pref]})
    with pytest.raises(Exception, match="every source needs format: preference"):
        Recipe(data={"train": [{"path": "a.jsonl"}]}, train={"method": "dpo"})
    with pytest.raises(Exception, match="orpo_lambda"):
        Recipe(data={"train": [pref]}, train={"method": "orpo"}, preference={"beta": 0.5})
    with pytest.raises(Exception, match="next-token term is always on"):
        Recipe(data={"train": [pref]}, train={"method": "orpo"}, preference={"sft_weight": 1.0})
    assert Recipe(data={"train": [pref]}, train={"method": "dpo"}, preference={"sft_weight": 1.0}).preference.sft_weight == 1
    with pytest.raises(Exception, match="sigmoid"):
        Recipe(data={"train": [pref]}, train={"method": "dpo"}, preference={"loss": "ipo", "label_smoothing": 0.1})
    with pytest.raises(Exception, match="model.adapter"):
        Recipe(data={"train": [pref]}, train={"method": "dpo"}, preference={"reference": "adapter_start"})
    ok = Recipe(data={"train": [pref]}, train={"method": "orpo"}, preference={"orpo_lambda": 0.2})
    # a run's resolved recipe writes every section with its defaults: reading it back must validate
    again = Recipe.model_validate(ok.model_dump())
    assert again == ok
    sft = Recipe(data={"train": [{"path": "a.jsonl"}]})
    assert Recipe.model_validate(sft.model_dump()) == sft


def _sequence_logp(model, ids: list[int], start: int) -> float:
    """Summed log-prob of ids[start:] given what precedes them, one plain forward."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[start - 1 :].sum())


def test_the_batch_tree_gives_each_answer_the_log_prob_of_its_own_forward(tiny_model_dir, tokenizer):
    """Prompt once, chosen and rejected after it, two pairs packed in one row and a third alone in another."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    pairs = []
    for q, good, bad in [("What is a lien?", "A claim on property.", "A fish."),
                         ("Is a verbal contract binding?", "Often, with exceptions.", "Never, anywhere, ever."),
                         ("Define tort.", "A civil wrong.", "A dessert made with many thin layers.")]:
        prompt = (Turn("system", "Be exact."), Turn("user", q))
        pairs.append(encode_pair(tokenizer, prompt + (Turn("assistant", good),), prompt + (Turn("assistant", bad),)))
    batch = collate([[pairs[0], pairs[1]], [pairs[2]]], tokenizer.pad_token_id)
    assert int(batch["pairs"]) == 3
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits.float()
    token_logp = torch.log_softmax(logits[batch["pair_rows"], batch["pair_cols"]], -1).gather(
        1, batch["pair_targets"][:, None])[:, 0]
    sums = torch.zeros(6).index_add_(0, batch["pair_index"], token_logp).view(3, 2)
    for i, e in enumerate(pairs):
        chosen = _sequence_logp(model, list(e.input_ids), e.branch)
        rejected = _sequence_logp(model, list(e.input_ids[: e.branch] + e.rejected_ids), e.branch)
        assert sums[i, 0].item() == pytest.approx(chosen, abs=1e-4)
        assert sums[i, 1].item() == pytest.approx(rejected, abs=1e-4)
    # labels carry the chosen answers only (what an SFT term on the chosen side trains)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(e.n_label_tokens for e in pairs)


def test_preference_data_with_sft_is_refused_naming_the_lines_and_the_fix(tmp_path):
    from llamatune.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("data:\n  train:\n    - path: p.jsonl\n      format: preference\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.yaml")
    text = str(info.value)
    assert "r.yaml" in text and "line 4" in text and "response: '{chosen}'" in text, text
