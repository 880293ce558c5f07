"""data.system_prompt is a decision, recorded and shown: model-default (the template's own, now named),
none (no system block even where the template adds one), or a text."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from llamatune.cli import app
from llamatune.data.encode import Turn, encode_turns, render_chat, set_chat_template

# chatml that adds its own system message when a conversation has none, as SmolLM2's does
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a careful clinician.<|im_end|>\n"
                  "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _with(recipe, **data):
    raw = yaml.safe_load(recipe.read_text())
    raw["data"].update(data)
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


@pytest.mark.parametrize("choice, says", [
    (None, "system message: the chat template's default, 'You are a careful clinician.' (data.system_prompt: model-default"),
    ("model-default", "system message: the chat template's default, 'You are a careful clinician.'"),
    ("none", "system message: none (data.system_prompt: none)"),
    ("Answer as a pharmacist.", "system message (data.system_prompt): 'Answer as a pharmacist.'"),
])
def test_data_check_says_which_system_message_every_example_gets(tiny_recipe, choice, says):
    _with(tiny_recipe, chat_template=DEFAULT_SYSTEM, **({"system_prompt": choice} if choice else {}))
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["data", "preview", str(tiny_recipe), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert says in result.output.replace("\n", " ")
    shown = result.output
    assert ("careful clinician" in shown.split(says)[-1]) == (choice in (None, "model-default"))
    assert ("pharmacist" in shown.split(says)[-1]) == (choice == "Answer as a pharmacist.")


def test_none_trains_without_a_system_block_and_the_run_says_so(tiny_recipe, tmp_path):
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    _with(tiny_recipe, chat_template=DEFAULT_SYSTEM, system_prompt="none")
    train(load_recipe(tiny_recipe, ["train.max_steps=1"]), "t", run_dir=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "data_manifest.json").read_text())
    assert manifest["system_prompt"] == {"choice": "none", "text": None}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")  # the template saved with the run
    assert "system" not in render_chat(tok, [{"role": "user", "content": "Hi"}], True)
    assert CliRunner().invoke(app, ["merge", str(tmp_path / "run")]).exit_code == 0
    card = (tmp_path / "run" / "merged" / "README.md").read_text()
    assert "- System message: none (data.system_prompt: none)" in card
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run" / "merged"), "--format", "ollama",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "SYSTEM" not in (tmp_path / "o" / "Modelfile").read_text()


@pytest.mark.slow
def test_none_on_smollm2s_real_template(builtin_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_folder)
    assert "named SmolLM" in render_chat(tok, [{"role": "user", "content": "Hi"}], True)
    set_chat_template(tok, "model", "none")
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}]):
        text = render_chat(tok, messages, False)
        assert "system" not in text and "SmolLM" not in text
    given = render_chat(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], True)
    assert given == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    example = encode_turns(tok, [Turn("user", "Hi"), Turn("assistant", "Yes.")])
    assert tok.decode(example.input_ids).startswith("<|im_start|>user\nHi")


def test_a_trained_system_text_becomes_the_modelfiles_system(tiny_recipe, tmp_path):
    from llamatune.recipe import load_recipe
    from llamatune.train.loop import train

    _with(tiny_recipe, system_prompt="Answer as a pharmacist.")
    train(load_recipe(tiny_recipe, ["train.max_steps=1"]), "t", run_dir=tmp_path / "run")
    assert CliRunner().invoke(app, ["merge", str(tmp_path / "run")]).exit_code == 0
    assert "- System message (data.system_prompt): 'Answer as a pharmacist.'" in (
        tmp_path / "run" / "merged" / "README.md").read_text()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run" / "merged"), "--format", "ollama",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert 'SYSTEM """Answer as a pharmacist."""' in (tmp_path / "o" / "Modelfile").read_text()
