"""Render conversations with the chat template, tokenize, and label only what the model should learn."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from llamatune.data.formats import Turn
from llamatune.errors import LlamatuneError, RecipeError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy skips targets with this value

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


@dataclass(frozen=True)
class Example:
    """One tokenized example: labels are IGNORE_INDEX where nothing is learned (prompts, padding)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    choices: tuple[str, ...] = ()  # classification / multiple choice: the closed answer set, for evaluation
    # format text: a window of a raw document. It has no prompt to answer (the first window has no prompt at all),
    # so evaluation scores it by loss only, never by generating.
    document: bool = False
    # format preference: input_ids/labels are prompt + chosen answer; the rejected answer's tokens continue the
    # prompt, input_ids[:branch], which a batch holds once for both (see batches.collate).
    branch: int = 0
    rejected_ids: tuple[int, ...] = ()
    rejected_labels: tuple[int, ...] = ()

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    @property
    def is_pair(self) -> bool:
        return bool(self.rejected_ids)

    @property
    def length(self) -> int:
        """Tokens the example takes in a batch row (a pair: prompt, chosen and rejected answers)."""
        return len(self.input_ids) + len(self.rejected_ids)


SYSTEM_CHOICES = ("model-default", "none")


def system_text(system_prompt: str | None) -> str | None:
    """The system message data.system_prompt puts in every example: its text, or None for model-default / none."""
    return None if system_prompt is None or system_prompt in SYSTEM_CHOICES else system_prompt


def system_decision(system_prompt: str | None, tokenizer) -> dict:
    """What data.system_prompt decided, for the manifest and every report: {"choice", "text"}."""
    if system_text(system_prompt):
        return {"choice": "text", "text": system_prompt}
    if system_prompt == "none":
        return {"choice": "none", "text": None}
    from llamatune.artifacts.modelfile import default_system_message

    return {"choice": "model-default", "text": default_system_message(tokenizer)}


def describe_system(decision: dict | None) -> str:
    """One line a person reads: which system message every example gets."""
    if not decision:
        return "system message: not recorded (a run made before llamatune recorded it)"
    if decision["choice"] == "text":
        return f"system message (data.system_prompt): {decision['text']!r}"
    if decision["choice"] == "none":
        return "system message: none (data.system_prompt: none)"
    if decision["text"]:
        return (f"system message: the chat template's default, {decision['text']!r} (data.system_prompt: model-default; "
                "set none or a text to change it)")
    return "system message: none (the chat template adds none; data.system_prompt: model-default)"


def set_chat_template(tokenizer, choice: str, system_prompt: str | None = None) -> None:
    """Applies data.chat_template: 'model' keeps the tokenizer's own, a name or Jinja text replaces it; with
    data.system_prompt: none, the template's own default system message is taken out of it.

    The tokenizer is saved into the run directory afterwards, so inference renders exactly as training did.

    Raises:
        LlamatuneError: For no template, or a default system message that cannot be taken out.
    """
    if choice != "model":
        tokenizer.chat_template = NAMED_TEMPLATES.get(choice, choice)
    if system_prompt == "none" and tokenizer.chat_template:
        _drop_default_system(tokenizer)
    if not tokenizer.chat_template:
        raise LlamatuneError(
            "the tokenizer has no chat template, so prompts cannot be rendered the way the model will see them at "
            "inference. Use an instruct/chat model, or set data.chat_template: chatml (or your own Jinja template)."
        )
    # Rendered once now, so a template that raises or does not parse fails here, naming the key, not mid-data.
    render_chat(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                            {"role": "assistant", "content": "a"}], add_generation_prompt=False)


def encode(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> Example:
    """Encodes one prompt → response exchange (see encode_turns)."""
    turns = ([Turn("system", system_prompt)] if system_prompt else []) + [Turn("user", prompt), Turn("assistant", response)]
    return encode_turns(tokenizer, turns)


def encode_turns(tokenizer, turns: Sequence[Turn]) -> Example:
    """Renders a conversation with the chat template and labels every assistant turn.

    For each assistant turn, the text up to it rendered with add_generation_prompt=True is what the
    model sees at inference; the rest of that turn (the answer and the template's end-of-turn token)
    is trained. Segments are tokenized separately, exactly as at inference, where generation starts
    right after the prompt, so the mask boundary is exact.

    Raises:
        LlamatuneError: If the template is not prefix-stable (the rendered prompt is not a prefix of
            the rendered conversation), so the answer cannot be located for the mask.
    """
    ids, labels, _ = _encode_segments(tokenizer, turns)
    return Example(input_ids=tuple(ids), labels=tuple(labels))


def encode_pair(tokenizer, chosen: Sequence[Turn], rejected: Sequence[Turn]) -> Example:
    """Encodes a preference pair: two conversations that share their first turns (the prompt).

    Only the answers after the shared turns are labelled (an earlier assistant turn of the prompt is context).
    The rejected branch keeps the tokens after the prompt; the prompt's tokens are those of the chosen conversation,
    which are the rejected one's too because both render the same turns segment by segment.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    c_ids, c_labels, c_starts = _encode_segments(tokenizer, chosen)
    r_ids, r_labels, r_starts = _encode_segments(tokenizer, rejected)
    branch = c_starts[shared]  # the first answer after the prompt (pairs.preference made it an assistant turn)
    if r_starts[shared] != branch or c_ids[:branch] != r_ids[:branch]:
        raise LlamatuneError("the chat template renders the same prompt differently before the chosen and the rejected "
                             "answer, so the pair has no shared prompt; set data.chat_template to a template whose "
                             "rendering of a message does not depend on later ones (e.g. chatml)")
    c_labels[:branch] = [IGNORE_INDEX] * branch
    return Example(input_ids=tuple(c_ids), labels=tuple(c_labels), branch=branch, rejected_ids=tuple(r_ids[branch:]),
                   rejected_labels=tuple(r_labels[branch:]))


def _encode_segments(tokenizer, turns: Sequence[Turn]) -> tuple[list[int], list[int], dict[int, int]]:
    """Token ids, labels, and where each assistant turn's answer starts (turn index -> token offset)."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    ids: list[int] = []
    labels: list[int] = []
    starts: dict[int, int] = {}
    done = ""
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LlamatuneError(
                "the chat template renders a conversation differently from its own prompt with add_generation_prompt=True "
                f"(turn {i}), so the answer cannot be located for the loss mask. Prompt ends with {prompt[-40:]!r}; "
                f"the conversation reads {full[len(prompt) - 40:len(prompt)]!r} there. Set data.chat_template to a "
                "prefix-stable template (e.g. chatml)."
            )
        context = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids += context
        starts[i] = len(ids)
        ids += answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = full
    return ids, labels, starts


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`.

    Raises:
        RecipeError: If a template the recipe set (data.chat_template) raises (its own raise_exception, a Jinja
            syntax error, a missing key): the recipe is where it must be fixed.
        LlamatuneError: If a template read from a file raises: named by that file.
    """
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:  # a template is user code
        roles = ", ".join(m["role"] for m in messages) or "none"
        origin = template_origin(tokenizer)
        if origin is None:
            raise RecipeError([f"data.chat_template: the chat template fails on a conversation (roles: {roles}): "
                               f"{type(exc).__name__}: {exc}. Fix the template, or use data.chat_template: chatml"]) from None
        raise LlamatuneError(f"the chat template from {origin} fails on a conversation (roles: {roles}): "
                             f"{exc}. Fix the template there (or set data.chat_template: chatml and train again)") from None


def _drop_default_system(tokenizer) -> None:
    """Wraps the template so that a conversation without a system message renders none, where the template would
    add its default: a marker system message is put first and its rendered block removed from the output."""
    from llamatune.artifacts.modelfile import default_system_message, system_block

    if default_system_message(tokenizer) is None:
        return  # the template adds nothing by itself
    marker = "\u2063LLAMATUNE-NO-SYSTEM\u2063"
    block = system_block(tokenizer, marker)
    tokenizer.chat_template = (
        "{% set _lt_given = messages|length > 0 and messages[0]['role'] == 'system' %}"
        "{% if not _lt_given %}{% set messages = [{'role': 'system', 'content': " + json.dumps(marker) + "}] + messages %}"
        "{% endif %}{% set _lt_out %}" + tokenizer.chat_template + "{% endset %}"
        "{% if _lt_given %}{{ _lt_out }}{% else %}{{ _lt_out | replace(" + json.dumps(block) + ", '', 1) }}{% endif %}")
    rendered = render_chat(tokenizer, [{"role": "user", "content": "u"}], add_generation_prompt=True)
    if default_system_message(tokenizer) is not None or marker in rendered:
        raise LlamatuneError("data.system_prompt: none: the chat template's own system message could not be taken out "
                             "of it; set data.system_prompt to a text, or data.chat_template to one without a default")


def template_origin(tokenizer) -> str | None:
    """Where the tokenizer's chat template was read from: the file in its folder that holds it, or None when it
    is not a file's (a recipe's data.chat_template)."""
    from pathlib import Path

    folder = Path(tokenizer.name_or_path)
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    try:
        if jinja.is_file() and jinja.read_text(encoding="utf-8") == tokenizer.chat_template:
            return str(jinja)
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("chat_template") == tokenizer.chat_template:
            return str(config)  # older transformers kept the template in the config
    except (OSError, ValueError):
        pass  # an unreadable file is not where the template in memory came from
    return None


def encode_document(tokenizer, text: str, max_length: int, overlap: int) -> list[Example]:
    """Splits a document into windows of at most max_length tokens; every token is trained once.

    Consecutive windows share `overlap` tokens (at least 1) of context; those are labelled only in the
    window where they first appear, so no token is lost and none counts twice. The document ends with EOS.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    windows, start, trained_until = [], 0, 0
    while True:
        window = ids[start : start + max_length]
        labels = [IGNORE_INDEX if start + j < trained_until else t for j, t in enumerate(window)]
        windows.append(Example(input_ids=tuple(window), labels=tuple(labels), document=True))
        trained_until = start + len(window)
        if trained_until >= len(ids):
            return windows
        # At least one token of overlap: a window's first token is never a target (nothing precedes
        # it), so it must be one the previous window already trained.
        start = trained_until - max(overlap, 1)


def end_of_turn_trained(example: Example, tokenizer) -> bool:
    """True if the tokenizer's EOS (the end-of-turn of chat templates) is among the trained labels (of both answers
    of a pair)."""
    return tokenizer.eos_token_id in example.labels and (not example.is_pair or tokenizer.eos_token_id in example.rejected_labels)
