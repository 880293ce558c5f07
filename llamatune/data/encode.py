"""Render records with the tokenizer's chat template, tokenize, and mask the prompt out of the loss."""

from __future__ import annotations

from dataclasses import dataclass

from llamatune.errors import LlamatuneError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy skips targets with this value


@dataclass(frozen=True)
class Example:
    """One tokenized training example: labels are IGNORE_INDEX on prompt tokens."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def encode(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> Example:
    """Renders one exchange with the chat template and builds completion-only labels.

    The prompt (system + user turn + the assistant header) and the completion (the answer and the
    template's end-of-turn token) are tokenized separately: that is exactly how the model sees them
    at inference, where generation starts right after the prompt, and it makes the mask boundary exact
    even where a tokenizer would merge characters across it.

    Raises:
        LlamatuneError: If the template renders the conversation so that it does not start with the
            rendered prompt (the boundary between prompt and answer would be undefined).
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise LlamatuneError(
            "the chat template renders the full conversation differently from the prompt with "
            "add_generation_prompt=True, so the answer cannot be located for the loss mask. "
            f"Prompt ends with {prompt_text[-40:]!r}; full text there reads {full_text[len(prompt_text) - 40:len(prompt_text)]!r}."
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return Example(
        input_ids=tuple(prompt_ids + completion_ids),
        labels=tuple([IGNORE_INDEX] * len(prompt_ids) + completion_ids),
    )
