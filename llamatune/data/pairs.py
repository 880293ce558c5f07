"""format: preference — a record becomes one prompt with two continuations, the chosen and the rejected one.

Three layouts, by configuration only (no dataset-specific code):
- pairs: fields, text: `prompt`, `chosen`, `rejected` are templates over the record ("{question}", "{good}").
- pairs: fields, messages: a template that is a single field holding a list of messages (OpenAI role/content or
  ShareGPT from/value) is read as those messages: TRL's conversational layout, prompt = [user...], chosen = [assistant].
- pairs: shared_prefix: `chosen` and `rejected` are two whole conversations (message lists, or text transcripts
  such as HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant: ..."); the messages they share are the prompt, and each
  continues from the first message where they differ, which must be an answer.
"""

from __future__ import annotations

import re

from llamatune.data.fields import lookup
from llamatune.data.formats import _ROLES, Drop, Rendered, Turn, _opening, _t, fill, message_turns
from llamatune.schema import SourceSpec


def preference(spec: SourceSpec, fields: dict, system_prompt: str | None) -> Rendered:
    """The prompt + chosen conversation in `turns`, the prompt + rejected one in `rejected`.

    Raises:
        Drop: For a missing field, an empty answer, identical answers, or conversations that share no prompt or
            part at something other than an answer.
    """
    if spec.pairs == "shared_prefix":
        chosen = _conversation(spec.chosen, fields, spec, "chosen")
        rejected = _conversation(spec.rejected, fields, spec, "rejected")
        if chosen[0] != rejected[0]:
            raise Drop("no_shared_prompt", "chosen and rejected do not start with the same message, so there is no "
                       "prompt (pairs: shared_prefix); with a separate prompt field use pairs: fields")
    else:
        prompt = _messages_or(spec.prompt, fields, spec, "prompt", "user")
        if prompt[-1].role == "assistant":
            raise Drop("bad_pair", "the prompt ends with an assistant message: there is nothing for chosen / rejected "
                       "to answer")
        chosen = prompt + _messages_or(spec.chosen, fields, spec, "chosen", "assistant")
        rejected = prompt + _messages_or(spec.rejected, fields, spec, "rejected", "assistant")
    chosen, rejected = _answered(chosen), _answered(rejected)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise Drop("same_answers", "chosen and rejected are the same")
    if shared == min(len(chosen), len(rejected)):
        raise Drop("no_answer", "one conversation is the other's beginning: it has no answer of its own")
    if chosen[shared].role != "assistant" or rejected[shared].role != "assistant":
        raise Drop("bad_pair", f"chosen and rejected part at a {chosen[shared].role} / {rejected[shared].role} message, "
                   "not at an answer: only the assistant's answers can be compared")
    opening = _opening(spec, fields, system_prompt) if chosen[0].role != "system" else []
    return Rendered(turns=tuple(opening + chosen), rejected=tuple(opening + rejected))


def _answered(turns: list[Turn]) -> list[Turn]:
    """A conversation without trailing user turns (they have no answer to compare)."""
    while turns and turns[-1].role != "assistant":
        turns = turns[:-1]
    return turns


def _raw(template: str, fields: dict):
    """A template that is a single field is read as that field's value (a list stays a list); anything else is
    rendered as text."""
    parts = _t(template).parts
    if len(parts) == 1 and not isinstance(parts[0], str):
        value = lookup(fields, parts[0].path)
        if isinstance(value, list):
            return value
    return fill(template, fields)


def _messages_or(template: str, fields: dict, spec: SourceSpec, key: str, role: str) -> list[Turn]:
    value = _raw(template, fields)
    if isinstance(value, list):
        return message_turns(value, spec.roles, key)
    return [Turn(role, value)]


def _conversation(template: str, fields: dict, spec: SourceSpec, key: str) -> list[Turn]:
    value = _raw(template, fields)
    if isinstance(value, list):
        return message_turns(value, spec.roles, key)
    return transcript_turns(value, spec.roles, key)


def transcript_turns(text: str, roles: dict[str, str], where: str) -> list[Turn]:
    """A text transcript ("Human: hi\\n\\nAssistant: hello", HH-RLHF's layout) as turns.

    A turn starts at the beginning of the text or after a blank line, with a known role name (system, user, human,
    assistant, ... and the source's `roles:`, any case) and a colon.

    Raises:
        Drop: When the text has no role marker, or text before the first one.
    """
    known = {name.lower(): role for name, role in {**_ROLES, **roles}.items()}
    names = "|".join(re.escape(n) for n in sorted(known, key=len, reverse=True))
    marker = re.compile(rf"(?:\A|\n\s*\n)[ \t]*({names})[ \t]*:[ \t]?", re.IGNORECASE)
    found = list(marker.finditer(text))
    if not found:
        raise Drop("no_transcript", f"{where} is text without role markers ('Human: ...', 'Assistant: ...' at the start "
                   "of a paragraph); pairs: shared_prefix needs two conversations (message lists or transcripts). Map "
                   "other speaker names with roles:, e.g. roles: {Patient: user}")
    if text[: found[0].start()].strip():
        raise Drop("no_transcript", f"{where} has text before its first role marker: {text[:40]!r}")
    turns = []
    for m, end in zip(found, [f.start() for f in found[1:]] + [len(text)]):
        content = text[m.end() : end].strip()
        if not content:
            raise Drop("empty", f"{where}: the {m.group(1)} message at character {m.start()} is empty")
        turns.append(Turn(known[m.group(1).lower()], content))
    return turns
