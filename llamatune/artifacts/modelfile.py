"""An Ollama Modelfile whose TEMPLATE renders exactly the prompts the training chat template renders.

Ollama does not run Jinja: it runs a Go template over `.Messages`. The training template is measured
instead of parsed: each role's wrapper (text before and after the content) is recovered by rendering a
marker message, the generation prompt by rendering with and without it, and a role-generic wrapper (chatml's
`<|im_start|>{role}`) by rendering a role nobody uses. The Go template renders every message in place, a
system message in the middle of a conversation included, and is then checked by rendering several
conversations both ways, the way Ollama feeds them (its SYSTEM line becomes the first message when a request
has none).
"""

from __future__ import annotations

import re
from pathlib import Path

from llamatune.errors import LlamatuneError

_MARKER = "\u2063LLAMATUNE\u2063"
_ANY_ROLE = "ltrole"  # a role name no template knows, to find a role-generic wrapper
_ROLES = ("system", "user", "assistant", "tool")
_NOT_A_WRAPPER = ("the chat template is not a plain per-role wrapper, so it cannot be written as an Ollama TEMPLATE exactly "
                  "({why}); use the GGUF file with llama.cpp, which reads the template from its metadata")


def ollama_modelfile(tokenizer, gguf_name: str, adapter_name: str | None = None, system: str | None = None) -> str:
    """The Modelfile text: FROM (and ADAPTER), TEMPLATE, stop PARAMETERs and SYSTEM: `system` (the text a run
    trained every example with, data.system_prompt), else the template's own default system message if any.

    Raises:
        LlamatuneError: If the template is not a per-role wrapper (it cannot be expressed this way).
    """
    preamble = _preamble(tokenizer)
    wrap = _wrappers(tokenizer, preamble)
    gen = _render(tokenizer, [_msg("user", "U")], True)[len(_render(tokenizer, [_msg("user", "U")], False)):]
    default = _default_system(tokenizer, wrap, preamble)
    for conversation in _checks(wrap):
        expected = _render(tokenizer, conversation, True)
        if preamble + _as_ollama(wrap, default, conversation, gen) != expected:
            roles = ", ".join(m["role"] for m in conversation)
            raise LlamatuneError(_NOT_A_WRAPPER.format(why=f"a conversation of {roles} renders differently"))
    pieces = [p for pair in wrap.values() for p in pair] + [preamble, gen, default or ""]
    if any('"""' in p for p in pieces):
        raise LlamatuneError(_NOT_A_WRAPPER.format(why='it contains """, which ends a Modelfile string'))
    lines = [f"FROM {gguf_name}"] + ([f"ADAPTER {adapter_name}"] if adapter_name else [])
    lines.append(f'TEMPLATE """{_go(preamble)}{_go_template(wrap, gen)}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings(tokenizer, wrap)]
    if system and '"""' in system:
        raise LlamatuneError(_NOT_A_WRAPPER.format(why='the system message contains """, which ends a Modelfile string'))
    if system or default:  # Ollama puts SYSTEM first when a request has no system message, as training did
        lines.append(f'SYSTEM """{system or default}"""')
    return "\n".join(lines) + "\n"


def default_system_message(tokenizer) -> str | None:
    """The system message the chat template adds by itself when a conversation has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM..."), or None (none added, or a template too irregular to tell)."""
    try:
        preamble = _preamble(tokenizer)
        return _default_system(tokenizer, _wrappers(tokenizer, preamble), preamble)
    except LlamatuneError:
        return None


def system_block(tokenizer, content: str) -> str:
    """The text a first system message with `content` renders to, without the template's preamble."""
    preamble = _preamble(tokenizer)
    head, tail = _wrapper(tokenizer, "system", preamble)
    return head + content + tail


def trained_system(run: Path | None) -> str | None:
    """The system message a run trained every example with (data.system_prompt set to a text), from its manifest."""
    import json

    try:
        decision = json.loads((run / "data_manifest.json").read_text()).get("system_prompt") or {}
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return decision.get("text") if decision.get("choice") == "text" else None


def ollama_name(source: Path) -> str:
    """A model name `ollama create` accepts (lowercase letters, digits, `.`, `_`, `-`; starts with a letter or
    digit), from the run's name when `source` is a run's merged/ folder."""
    name = source.parent.name if source.name == "merged" and (source / "merge_report.json").is_file() else source.name
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return (name[:60].rstrip("-._") or "llamatune-model")


def stop_strings(tokenizer, wrap: dict[str, tuple[str, str]]) -> list[str]:
    """The end-of-turn texts that end an answer: the tokenizer's EOS and the special token the template closes
    an assistant turn with (Llama 3 ends turns with <|eot_id|>, not its EOS)."""
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    tail = wrap["assistant"][1].strip()
    for token in sorted(special, key=len, reverse=True):
        if tail.startswith(token) and token not in stops:
            stops.append(token)
            break
    return stops


def _preamble(tokenizer) -> str:
    """What the template writes once before the first message (Llama 3's <|begin_of_text|>): the part of a first
    system message's head that the same message later in a conversation does not get."""
    try:
        first = _render(tokenizer, [_msg("system", _MARKER)], False).partition(_MARKER)[0]
        before = _render(tokenizer, [_msg("user", "U")], False)
        later = _render(tokenizer, [_msg("user", "U"), _msg("system", _MARKER)], False)
    except LlamatuneError:  # a template that refuses a later system message: nothing to tell apart
        return ""
    if not later.startswith(before):
        return ""
    head = later[len(before):].partition(_MARKER)[0]
    return first[: len(first) - len(head)] if head and first.endswith(head) else ""


def _wrappers(tokenizer, preamble: str) -> dict[str, tuple[str, str]]:
    """(text before, text after) the content, for each role the template renders, and `*` for any other role
    when the template names roles generically."""
    wrap = {}
    for role in _ROLES + (_ANY_ROLE,):
        try:
            wrap[role] = _wrapper(tokenizer, role, preamble)
        except LlamatuneError:  # a template that raises for a role it does not support: Ollama will not render it either
            continue
    for role in ("system", "user", "assistant"):
        if role not in wrap:
            raise LlamatuneError(_NOT_A_WRAPPER.format(why=f"it does not render a {role} message on its own"))
    generic = wrap.pop(_ANY_ROLE, None)
    if generic and _ANY_ROLE in generic[0] + generic[1]:
        wrap["*"] = generic
    return wrap


def _wrapper(tokenizer, role: str, preamble: str) -> tuple[str, str]:
    """(text before, text after) the content of one `role` message, measured with a marker."""
    context = [_msg("system", "S")] if role != "system" else []
    before = _render(tokenizer, context, False) if context else preamble
    text = _render(tokenizer, context + [_msg(role, _MARKER)], False)
    if not text.startswith(before) or _MARKER not in text[len(before):]:
        raise LlamatuneError(_NOT_A_WRAPPER.format(why=f"a {role} message does not render its content once, in place"))
    head, _, tail = text[len(before):].partition(_MARKER)
    return head, tail


def _for_role(wrap: dict, role: str) -> tuple[str, str] | None:
    if role in wrap:
        return wrap[role]
    if "*" in wrap:
        head, tail = wrap["*"]
        return head.replace(_ANY_ROLE, role), tail.replace(_ANY_ROLE, role)
    return None


def _as_ollama(wrap: dict, default: str | None, conversation: list[dict], gen: str) -> str:
    """What Ollama renders from our Go template for `conversation` (its SYSTEM first when none is given)."""
    if default and conversation[0]["role"] != "system":
        conversation = [_msg("system", default)] + conversation
    out = []
    for m in conversation:
        pair = _for_role(wrap, m["role"])
        out.append(pair[0] + m["content"] + pair[1] if pair else "")
    return "".join(out) + gen


def _checks(wrap: dict) -> list[list[dict]]:
    """Conversations both renderings must agree on: the usual one, a system message in the middle, no system
    message (the template's own default), and a tool result when the template renders tool messages."""
    s, u, a = _msg("system", "You are careful."), _msg("user", "Hi"), _msg("assistant", "Hello")
    checks = [[s, u, a, _msg("user", "Bye")], [u, a, _msg("system", "Be brief."), _msg("user", "Why?")], [u]]
    if _for_role(wrap, "tool"):
        checks.append([s, u, _msg("assistant", "Looking it up."), _msg("tool", '{"dose": "5 mg"}'), _msg("user", "And?")])
    return checks


def _go(text: str) -> str:
    """Literal text in a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def _go_template(wrap: dict, gen: str) -> str:
    """One Go-template line (no `{{-`, which would trim the newlines wrappers end with)."""
    go = _go
    generic = {"*": wrap["*"]} if "*" in wrap else {}
    branches = []
    for role in _ROLES:  # a role of its own only where it differs from the generic wrapper
        pair = wrap.get(role)
        if pair and pair != _for_role(generic, role):
            branches.append((f'eq .Role "{role}"', go(pair[0]) + "{{ .Content }}" + go(pair[1])))
    body = "".join(("{{ if " if i == 0 else "{{ else if ") + test + " }}" + text for i, (test, text) in enumerate(branches))
    if generic:
        head, tail = (go(p).replace(_ANY_ROLE, "{{ .Role }}") for p in wrap["*"])
        body += ("{{ else }}" if branches else "") + head + "{{ .Content }}" + tail
    if branches:
        body += "{{ end }}"
    return "{{ range .Messages }}" + body + "{{ end }}" + go(gen)


def _default_system(tokenizer, wrap, preamble: str) -> str | None:
    alone = _render(tokenizer, [_msg("user", "U")], False)[len(preamble):]
    head, tail = wrap["system"]
    if alone.startswith(head) and tail in alone[len(head):]:
        return alone[len(head):].split(tail, 1)[0]
    return None


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    from llamatune.data.encode import render_chat

    return render_chat(tokenizer, messages, generation_prompt)
