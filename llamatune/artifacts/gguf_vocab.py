"""The tokenizer inside a GGUF file: tokens, types, merges, special ids, chat template, and the pre-tokenizer
name llama.cpp needs to split text the way training did.

llama.cpp re-implements each family's pre-tokenization regexes and picks them by the `tokenizer.ggml.pre`
name; a wrong name does not fail, it silently tokenizes differently (SmolLM2 under "default" splits `'s`,
` (` and ` —` unlike its training tokenizer). So the name is derived, never defaulted: first by the
fingerprint llama.cpp's own converter uses (`pretokenizers.KNOWN`), then, for tokenizers trained by the
user, from the Hugging Face pre-tokenizer's structure when it is one llama.cpp implements exactly. Anything
else is refused before a byte is written.
"""

from __future__ import annotations

import hashlib
import json

from llamatune.errors import LlamatuneError

# The GPT-2 split as Hugging Face's ByteLevel(use_regex=True) applies it; llama.cpp's "gpt-2" is the same.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(tokenizer) -> str:
    """The `tokenizer.ggml.pre` value under which llama.cpp splits text as `tokenizer` does.

    Raises:
        LlamatuneError: For a tokenizer llama.cpp would not reproduce: an unknown pre-tokenizer, a
            normalizer (llama.cpp applies none to BPE vocabularies) or a prefix space.
    """
    from llamatune.artifacts.pretokenizers import CHECK_TEXT, KNOWN

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    fingerprint = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT, add_special_tokens=False)).encode()).hexdigest()
    if fingerprint in KNOWN:
        return KNOWN[fingerprint]
    if backend.get("normalizer"):
        raise LlamatuneError(f"the tokenizer normalizes text first ({backend['normalizer'].get('type')}), which "
                             "llama.cpp does not do for BPE vocabularies: the GGUF would tokenize differently than "
                             "training; deploy the merged folder with transformers or vLLM instead")
    name = _by_structure(backend.get("pre_tokenizer") or {})
    if name is None:
        shown = json.dumps(backend.get("pre_tokenizer"))[:300]
        raise LlamatuneError(
            f"llama.cpp has no pre-tokenizer known to split text like this tokenizer (fingerprint {fingerprint[:16]}…, "
            f"pre_tokenizer {shown}); a GGUF written with a guessed one would tokenize prompts differently than "
            "training. Use a tokenizer llama.cpp supports (GPT-2, SmolLM/StarCoder, Llama 3 style), or deploy the "
            "merged folder with transformers or vLLM")
    return name


def _by_structure(pre: dict) -> str | None:
    """The llama.cpp name for the pre-tokenizers it implements exactly, recognised by their parts."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # digits one by one, then the GPT-2 split: llama.cpp's starcoder/smollm family
    if (kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True)
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT and steps[0].get("behavior") == "Isolated"):
        return "llama-bpe"
    return None


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Writes byte-level BPE (GPT-2 style) tokens, their types, merges, special ids, the pre-tokenizer name and
    the chat template into `writer`'s metadata.

    Raises:
        LlamatuneError: For a tokenizer that is not byte-level BPE, or whose splitting llama.cpp would not
            reproduce (see `pre_tokenizer_name`).
    """
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise LlamatuneError(f"tokenizer model {backend['model']['type']!r}: GGUF export supports byte-level BPE tokenizers")
    pre = pre_tokenizer_name(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t["id"]: bool(t.get("special")) for t in backend.get("added_tokens", [])}
    special = set(tokenizer.all_special_ids) | {i for i, is_special in added.items() if is_special}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        # added non-special tokens are matched whole by both tokenizers: llama.cpp's USER_DEFINED type
        types.append(gguf.TokenType.CONTROL if i in special
                     else gguf.TokenType.USER_DEFINED if i not in by_id or i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
