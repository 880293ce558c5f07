"""Formats: a record's fields → the turns of a conversation (or a document for `text`).

One function per format, dispatched by a dict. A record that cannot become an example raises Drop
with a reason; the pipeline counts drops by reason (or fails, in strict mode).
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass
from functools import lru_cache

from llamatune.data.fields import MissingField, Template, lookup, parse_template, to_text
from llamatune.schema import SourceSpec

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
          "bot": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class Turn:
    """One message. Assistant turns are the trained ones."""

    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Rendered:
    """What a record became: chat turns (or a raw document for format text); for classification/multiple choice,
    the closed set of answers an evaluator may compare against; for preference, the rejected conversation too."""

    turns: tuple[Turn, ...] = ()
    document: str | None = None
    choices: tuple[str, ...] = ()
    rejected: tuple[Turn, ...] = ()  # format preference: the same prompt with the rejected answer (turns: the chosen)


class Drop(Exception):
    """This record yields no example, for `reason` (a short key counted in the manifest).

    Attributes:
        field: For reason missing_field, the dotted path that was missing (the pipeline tells a template
            field no record has from one a few records lack).
    """

    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.field = reason, detail, field


class RecordProblem(Exception):
    """A record shows that the source's configuration is wrong (an unknown chat role): not a drop, an error
    the pipeline reports with the record's place and the recipe key to change.

    Attributes:
        key: The source's key that fixes it (e.g. "roles").
    """

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@lru_cache(maxsize=256)
def _t(text: str) -> Template:
    return parse_template(text)


def fill(template: str, fields: dict) -> str:
    """Renders a template over a record; a missing field or an empty result is a Drop."""
    try:
        value = _t(template).render(fields)
    except MissingField as exc:
        close = difflib.get_close_matches(exc.path.split(".")[0], exc.available, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close and close[0] != exc.path.split(".")[0] else ""
        raise Drop("missing_field", f"no field {exc.path!r} (fields here: {', '.join(exc.available[:12])}){hint}",
                   field=exc.path) from None
    if not value.strip():
        raise Drop("empty", f"template {template!r} renders empty")
    return value


def _opening(spec: SourceSpec, fields: dict, system_prompt: str | None) -> list[Turn]:
    from llamatune.data.encode import system_text

    system = fill(spec.system, fields) if spec.system else system_text(system_prompt)
    return [Turn("system", system)] if system else []


def instruction(spec: SourceSpec, fields: dict, system_prompt: str | None, labels: tuple[str, ...]) -> Rendered:
    turns = _opening(spec, fields, system_prompt)
    turns += [Turn("user", fill(spec.prompt, fields)), Turn("assistant", fill(spec.response, fields))]
    return Rendered(turns=tuple(turns))


def classification(spec: SourceSpec, fields: dict, system_prompt: str | None, labels: tuple[str, ...]) -> Rendered:
    label = fill(spec.answer, fields).strip()
    if label not in labels:
        raise Drop("label_not_in_set", f"label {label!r} is not one of {', '.join(labels)}")
    prompt = f"{fill(spec.prompt, fields)}\n\nAnswer with one of: {', '.join(labels)}."
    turns = _opening(spec, fields, system_prompt) + [Turn("user", prompt), Turn("assistant", label)]
    return Rendered(turns=tuple(turns), choices=labels)


def multiple_choice(spec: SourceSpec, fields: dict, system_prompt: str | None, labels: tuple[str, ...]) -> Rendered:
    options = lookup(fields, tuple(spec.options.split(".")))
    if isinstance(options, dict):
        letters, texts = [str(k) for k in options], [to_text(v) for v in options.values()]
    elif isinstance(options, list) and options:
        letters, texts = list(string.ascii_uppercase[: len(options)]), [to_text(v) for v in options]
    elif options is None:
        raise Drop("missing_field", f"no field {spec.options!r} (the options; fields here: {', '.join(map(str, fields))})",
                   field=spec.options)
    else:
        raise Drop("bad_options", f"options {spec.options!r} is {type(options).__name__} {str(options)[:40]!r}, not a "
                   "non-empty list or mapping letter -> text")
    answer = fill(spec.answer, fields).strip()
    if answer not in letters:
        if answer not in texts:
            raise Drop("label_not_in_set", f"answer {answer!r} is neither an option letter ({', '.join(letters)}) nor an option text")
        answer = letters[texts.index(answer)]
    listed = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, texts))
    if spec.answer_with == "option":
        if len(set(texts)) != len(texts):
            raise Drop("duplicate_options", "two options have the same text: answer_with option cannot tell them apart")
        answer, choices, ask = texts[letters.index(answer)], tuple(texts), "Answer with the text of the correct option."
    else:
        choices, ask = tuple(letters), "Answer with the letter of the correct option."
    prompt = f"{fill(spec.prompt, fields)}\n\n{listed}\n\n{ask}"
    turns = _opening(spec, fields, system_prompt) + [Turn("user", prompt), Turn("assistant", answer)]
    return Rendered(turns=tuple(turns), choices=choices)


def chat(spec: SourceSpec, fields: dict, system_prompt: str | None, labels: tuple[str, ...]) -> Rendered:
    messages = lookup(fields, tuple(spec.messages.split(".")))
    if messages is None:
        raise Drop("missing_field", f"no field {spec.messages!r} (the message list; fields here: "
                   f"{', '.join(map(str, fields))})", field=spec.messages)
    turns = message_turns(messages, spec.roles, spec.messages)
    if turns[0].role != "system":
        turns = _opening(spec, fields, system_prompt) + turns
    if not any(t.role == "assistant" for t in turns):
        raise Drop("no_assistant_turn", "the conversation has no assistant message to train on")
    while turns[-1].role != "assistant":
        turns.pop()  # trailing user turns have no answer to learn
    return Rendered(turns=tuple(turns))


def message_turns(messages, roles: dict[str, str], where: str) -> list[Turn]:
    """A list of OpenAI (role/content) or ShareGPT (from/value) messages as turns, roles mapped by `roles`.

    Raises:
        Drop: For something that is not a non-empty list of messages with text.
        RecordProblem: For a role nobody mapped (a configuration problem, named with the key to change).
    """
    if not isinstance(messages, list) or not messages:
        raise Drop("bad_messages", f"{where!r} is {type(messages).__name__} {str(messages)[:40]!r}, not a "
                   "non-empty list of messages")
    known = {**_ROLES, **roles}
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Drop("bad_message", f"message {i} of {where!r} is {type(message).__name__}, not an object")
        raw_role = message.get("role", message.get("from"))
        content = _content_text(message.get("content", message.get("value")))
        if raw_role not in known:
            # An unknown role is a configuration problem, not a bad record: say how to map it.
            raise RecordProblem(f"chat role {raw_role!r} in message {i} of {where!r} is unknown; known roles: "
                                f"{', '.join(sorted(known))}. Map it in the source, e.g. roles: {{{raw_role}: user}} "
                                "(or assistant, system)", key="roles")
        if not isinstance(content, str) or not content.strip():
            raise Drop("empty", f"message {i} of {where!r} has no text content")
        turns.append(Turn(known[raw_role], content))
    return turns


def _content_text(content):
    """OpenAI's content parts ([{"type": "text", "text": ...}, ...]) as one string; a part that is not text
    (an image, audio) cannot be trained by a text model, so such a message is dropped, not half-read."""
    if not isinstance(content, list):
        return content
    kinds = {part.get("type") for part in content if isinstance(part, dict)}
    if kinds != {"text"} or not all(isinstance(p, dict) for p in content):
        raise Drop("non_text_content", f"message content holds parts of type {', '.join(sorted(map(str, kinds)))}; only "
                   "text parts can be trained")
    return "".join(str(part.get("text", "")) for part in content)


def text(spec: SourceSpec, fields: dict, system_prompt: str | None, labels: tuple[str, ...]) -> Rendered:
    return Rendered(document=fill(spec.text, fields))


FORMATS = {
    "instruction": instruction,
    "classification": classification,
    "multiple_choice": multiple_choice,
    "chat": chat,
    "text": text,
    "preference": lambda spec, fields, system_prompt, labels: preference(spec, fields, system_prompt),
}

from llamatune.data.pairs import preference  # noqa: E402  (pairs.py builds on the helpers above)
