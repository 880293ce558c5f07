"""`llamatune chat`: talk to a run (or any model) by hand, with the chat template used in training,
tokens streamed as they are generated; `--compare base` answers each turn with the adapter off, then on."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from llamatune.data.encode import render_chat
from llamatune.errors import RecipeError
from llamatune.evaluate.target import load_target


def chat(path: Path, compare_base: bool, max_new_tokens: int, system: str | None,
         read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """Runs the interactive loop until an empty line, /exit or end of input.

    Args:
        read: Shows a prompt and returns the user's line (raises EOFError at end of input).
        write: Prints a line (labels, hints).
    """
    import torch
    from transformers import TextStreamer

    target = load_target(path, say=write)
    if compare_base and not target.has_adapter:
        raise RecipeError([f"--compare base needs a run directory (an adapter to switch off); {path} is a plain model"])
    tok, model = target.tokenizer, target.model
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    history = [{"role": "system", "content": system}] if system else []
    # A template that raises fails now, not after the first message is typed.
    render_chat(tok, history + [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    write(_banner(target, system))
    write("type a message; an empty line or /exit ends the chat")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        history.append({"role": "user", "content": line})
        # Rendered, then tokenized without special tokens: what apply_chat_template(tokenize=True) does, with
        # a template that raises reported by the file it came from.
        text = render_chat(tok, history, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        answer = ""
        for label, adapter in ([("base", False)] if compare_base else []) + [("tuned" if target.has_adapter else "model", True)]:
            write(f"{label}>")
            switch = nullcontext() if adapter or not target.has_adapter else model.disable_adapter()
            with torch.no_grad(), switch:
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, streamer=streamer, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, use_cache=True)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})  # the conversation continues with the tuned answer


def _banner(target, system: str | None) -> str:
    """Which model, adapter, chat template and system message this chat runs, said before the first turn."""
    from llamatune.artifacts.modelfile import default_system_message
    from llamatune.data.encode import template_origin

    if target.has_adapter:
        what = f"run {target.name}: base {target.recipe.model.path} + its adapter"
    else:
        what = f"model {target.name} (no adapter)"
    origin = template_origin(target.tokenizer) or "the recipe's data.chat_template"
    default = None if system else default_system_message(target.tokenizer)
    said = (f"system message {system!r} (--system)" if system else
            f"the template's default system message {default!r} (--system replaces it)" if default else "no system message")
    return f"{what}; chat template from {origin}; {said}"
