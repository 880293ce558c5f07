"""llama.cpp itself, through llama-cpp-python, as the reference runtime for the GGUF files llamatune writes.

Optional: `pip install llama-cpp-python` (in the `dev` extra) builds llama.cpp from source. Export uses it,
when present, to prove a file in the runtime users deploy to (tokenizer parity, logits); tests use it for
the same and for llama.cpp's own quantizer. Without it, export says what it could not check.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def available() -> bool:
    """True when llama-cpp-python imports (llama.cpp built and loadable here)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # an ImportError, or a library built for another machine (OSError)
        return False
    return True


@contextlib.contextmanager
def _quiet():
    """llama.cpp prints its loading log on file descriptor 2 from C; `verbose=False` does not stop all of it."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_model(path: Path, *, vocab_only: bool = False, n_ctx: int = 512, lora: Path | None = None):
    """A `llama_cpp.Llama` for `path` (and a LoRA adapter GGUF on top), all logits kept, on the CPU."""
    import llama_cpp

    with _quiet():
        return llama_cpp.Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=n_ctx, n_batch=n_ctx,
                               logits_all=not vocab_only, n_threads=max(1, (os.cpu_count() or 2)),
                               lora_path=str(lora) if lora else None, verbose=False, seed=0)


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's token ids for `text`: no BOS added, special-token text read as those tokens (as Hugging Face tokenizers do)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def tokenizer_mismatches(path: Path, tokenizer, texts: list[str]) -> list[tuple[str, list[int], list[int]]]:
    """(text, training ids, llama.cpp ids) for each text the GGUF at `path` tokenizes differently."""
    llm = open_model(path, vocab_only=True)
    try:
        wrong = []
        for text in texts:
            want = tokenizer.encode(text, add_special_tokens=False)
            got = tokenize(llm, text)
            if got != want:
                wrong.append((text, want, got))
        return wrong
    finally:
        llm.close()


def logits(llm, ids: list[int]):
    """float32 array [len(ids), vocab]: llama.cpp's next-token logits at every position of `ids`."""
    import numpy as np

    llm.reset()
    with _quiet():
        llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def chat_prompt(llm, messages: list[dict], generation_prompt: bool = True) -> str:
    """The prompt llama.cpp's own chat formatting renders from the template embedded in the GGUF."""
    import ctypes

    import llama_cpp

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no tokenizer.chat_template")
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]  # alive while C reads them
    chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep])
    size = 4 * sum(len(r) + len(c) for r, c in keep) + 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), generation_prompt, buf, size)
    if n < 0:
        raise ValueError("llama.cpp does not recognise this chat template")
    return buf.raw[:n].decode("utf-8")
