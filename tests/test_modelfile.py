"""The Ollama Modelfile: its TEMPLATE, run by Go's own text/template (the engine Ollama renders prompts with),
gives exactly the training chat template's prompt for every conversation shape, system messages in place,
tool messages, and the template's default system message (Ollama's SYSTEM line)."""

import json
import re
import shutil
import subprocess

import pytest

from llamatune.artifacts.modelfile import ollama_modelfile, ollama_name
from llamatune.data.encode import render_chat
from llamatune.errors import LlamatuneError

# Ollama executes TEMPLATE with Go's text/template over a value whose .Messages holds role/content pairs.
_GO = r"""
package main

import ("encoding/json"; "os"; "text/template")

type Message struct { Role string `json:"role"`; Content string `json:"content"` }
type Values struct { Messages []Message; System string; Prompt string }

func main() {
	var in struct { Template string `json:"template"`; Messages []Message `json:"messages"` }
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
	t := template.Must(template.New("modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, Values{Messages: in.Messages}); err != nil { panic(err) }
}
"""

LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Roles spelled out, tool results refused: a template that supports only what it names.
EXPLICIT_ROLES = ("{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
                  "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}\n"
                  "{% else %}{{ raise_exception('unsupported role ' + m['role']) }}{% endif %}{% endfor %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a careful clinician.<|im_end|>\n"
                  "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go): Ollama's template engine is Go's text/template")
    folder = tmp_path_factory.mktemp("gotemplate")
    (folder / "main.go").write_text(_GO)
    env = {"HOME": str(folder), "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "PATH": "/usr/bin:/bin",
           "GO111MODULE": "off", "GOFLAGS": "-mod=mod"}
    subprocess.run(["go", "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env,
                   capture_output=True)

    def render(template: str, messages: list[dict]) -> str:
        run = subprocess.run([str(folder / "render")], input=json.dumps({"template": template, "messages": messages}),
                             capture_output=True, text=True, check=True)
        return run.stdout

    return render


def _template_and_system(modelfile: str) -> tuple[str, str | None]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    return template, system.group(1) if system else None


def _as_ollama_sends(messages: list[dict], system: str | None) -> list[dict]:
    """Ollama's chat endpoint: the Modelfile SYSTEM first when the request has no system message."""
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


CONVERSATIONS = [
    [{"role": "user", "content": "What is a fever?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Define tort."}],
    [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "Which drug?"},
     {"role": "system", "content": "Cite the label."}, {"role": "user", "content": "Ibuprofen {{ .Content }}"}],
]
TOOL = [{"role": "user", "content": "Look up the dose."}, {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": '{"dose": "5 mg"}'}, {"role": "user", "content": "So?"}]


@pytest.mark.parametrize("name", ["chatml", "llama3_style", "explicit_roles", "default_system"])
def test_go_rendering_equals_the_training_template(name, tiny_model_dir, go_render):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if name == "llama3_style":
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = {"chatml": tok.chat_template, "llama3_style": LLAMA3_STYLE, "explicit_roles": EXPLICIT_ROLES,
                         "default_system": DEFAULT_SYSTEM}[name]
    modelfile = ollama_modelfile(tok, "./model.gguf")
    template, system = _template_and_system(modelfile)
    conversations = CONVERSATIONS + ([TOOL] if name != "explicit_roles" else [])
    if name == "explicit_roles":
        conversations = [c for c in conversations if c[-1]["role"] == "user" and "{{" not in c[-1]["content"]][:2]
    for messages in conversations:
        want = render_chat(tok, messages, True)
        assert go_render(template, _as_ollama_sends(messages, system)) == want, (name, messages)
    assert (system == "You are a careful clinician.") == (name == "default_system")
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)
    if name == "llama3_style":
        assert "<|eot_id|>" in stops  # the turn ends with <|eot_id|>, not the tokenizer's EOS
    if name == "chatml":
        assert stops == ["<|im_end|>"] and "{{ .Role }}" in template  # one generic branch serves every role


def test_a_template_that_is_not_a_role_wrapper_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"  # numbers turns
    with pytest.raises(LlamatuneError, match="not a plain per-role wrapper"):
        ollama_modelfile(tok, "./model.gguf")


def test_ollama_names_are_ones_ollama_create_accepts(tmp_path):
    run = tmp_path / "My Run (v2)!"
    (run / "merged").mkdir(parents=True)
    (run / "merged" / "merge_report.json").write_text("{}")
    assert ollama_name(run / "merged") == "my-run-v2"  # the run's name, not "merged"
    assert ollama_name(tmp_path / "Ünïcode__Model..") == "n-code__model"
    assert ollama_name(tmp_path / "!!!") == "llamatune-model"
    assert len(ollama_name(tmp_path / ("x" * 300))) <= 60
