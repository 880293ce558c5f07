"""`llamatune export --format gguf|ollama`: a Llama model folder → one GGUF file (and an Ollama Modelfile), in pure Python on the `gguf`
package (no llama.cpp checkout, no compiled tools).

Layout follows llama.cpp's Llama conventions: `token_embd`, `blk.N.attn_q|attn_k|attn_v|attn_output|
attn_norm|ffn_gate|ffn_up|ffn_down|ffn_norm`, `output_norm`, `output` (absent when tied); Q and K rows
are permuted from Hugging Face's rotary layout to llama.cpp's (the inverse of what loaders undo);
norms stay float32. The tokenizer (tokens, types, merges, special ids) and the chat template go into
the metadata, so the file is self-contained.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Callable

from llamatune.artifacts.files import check_output, fix_for_model, opened
from llamatune.errors import LlamatuneError

# Hugging Face Llama layer module → llama.cpp tensor name (also what a GGUF LoRA adapter names its pairs after).
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
QUANTS = ("f16", "q8_0")


def export_gguf(source: Path, out: Path, quant: str = "f16", say: Callable[[str], None] = print, tokenizer=None) -> Path:
    """Writes `out` (.gguf) from a Llama model folder (e.g. `llamatune merge` output), atomically, holding the
    lock on `out` so that a second export into the same file stops at once instead of interleaving.

    Args:
        tokenizer: The tokenizer to embed instead of `source`'s own (a run's, whose chat template is the trained one).

    Raises:
        LlamatuneError: For a non-Llama model, a damaged file in `source`, an output that exists or cannot be
            written, or another process writing it.
    """
    from llamatune import lock

    check_output(out, "--out")  # before the lock, which creates out's parent folders
    with lock.hold(out, "exporting"):
        check_output(out, "--out")  # again: an export that finished while we waited wrote it
        _write_gguf(source, out, quant, tokenizer)
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {quant})")
    return out


def _write_gguf(source: Path, out: Path, quant: str, tokenizer=None) -> None:
    """Writes the GGUF file through `.NAME.partial` beside it, renamed when complete. The caller holds the lock
    on `out`, so the fixed name is ours alone, and a partial file a killed export left is simply overwritten."""
    import gguf

    config, model, own = _open_model(source)
    tokenizer = own if tokenizer is None else tokenizer
    tmp = out.parent / f".{out.name}.partial"
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _add_hyperparameters(writer, source, config, quant)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, tensor in _tensors(model, config):
            _add_tensor(writer, name, tensor, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _open_model(source: Path):
    """(config, float32 model, tokenizer) of a Llama model folder; a damaged file is named, with how to remake it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fix = fix_for_model(source)
    config = opened(partial(AutoConfig.from_pretrained, source), source, "model", fix)
    if config.model_type != "llama":
        raise LlamatuneError(f"{source}: model type {config.model_type!r}; GGUF export supports Llama-architecture models")
    model = opened(partial(AutoModelForCausalLM.from_pretrained, source, dtype=torch.float32), source, "model", fix)
    tokenizer = opened(partial(AutoTokenizer.from_pretrained, source), source, "tokenizer", fix)
    return config, model, tokenizer


def _add_hyperparameters(writer, source: Path, config, quant: str) -> None:
    import gguf

    writer.add_name(source.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])


def _tensors(model, config):
    """(gguf name, float32 numpy array) for every weight, Q/K permuted to llama.cpp's rotary layout."""
    state = model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"].numpy()
    for i in range(config.num_hidden_layers):
        for hf, short in LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf}.weight"].numpy()
            if short == "attn_q":
                w = permute_rotary(w, config.num_attention_heads)
            elif short == "attn_k":
                w = permute_rotary(w, config.num_key_value_heads)
            yield f"blk.{i}.{short}.weight", w
    yield "output_norm.weight", state["model.norm.weight"].numpy()
    if not config.tie_word_embeddings:
        yield "output.weight", state["lm_head.weight"].numpy()


def permute_rotary(w, n_heads: int):
    """Rows of a Q or K projection [n_heads * head_dim, ...] (or a LoRA B of one) in llama.cpp's rotary order."""
    # HF keeps each head's rotary halves as [first half | second half]; llama.cpp interleaves them.
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensor(writer, name: str, data, quant: str) -> None:
    import gguf
    import numpy as np

    if data.ndim == 1 or name.endswith("norm.weight"):
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "f16" or name in ("token_embd.weight", "output.weight"):
        # q8_0 keeps the embedding / output head in f16 (as llama.cpp's --leave-output-tensor): with tied
        # embeddings it produces every logit, and 8-bit rounding there flips near-tied greedy choices.
        writer.add_tensor(name, data.astype(np.float16))
    else:
        packed = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 style) tokens, their types, merges, special ids and the chat template."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise LlamatuneError(f"tokenizer model {backend['model']['type']!r}: GGUF export supports byte-level BPE tokenizers")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids) | {t["id"] for t in backend.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i not in by_id
                     else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
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


def export_ollama(source: Path, folder: Path, quant: str = "f16", say: Callable[[str], None] = print) -> Path:
    """Writes `folder` with model.gguf and a Modelfile (staging folder + rename, under the lock on `folder`), and
    prints the create command."""
    import shutil

    from transformers import AutoTokenizer

    from llamatune import lock

    check_output(folder, "--out")
    with lock.hold(folder, "exporting"):
        check_output(folder, "--out")
        tokenizer = opened(partial(AutoTokenizer.from_pretrained, source), source, "tokenizer", fix_for_model(source))
        modelfile = ollama_modelfile(tokenizer, "model.gguf")  # fail before the big write
        staging = folder.parent / f".{folder.name}.partial"  # ours alone while we hold the lock
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            _write_gguf(source, staging / "model.gguf", quant)
            (staging / "Modelfile").write_text(modelfile)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {folder} (model.gguf {(folder / 'model.gguf').stat().st_size / 2**20:.1f} MiB, {quant}; Modelfile)")
    say(f"ollama create {source.name.lower()} -f {folder / 'Modelfile'}")
    return folder


def ollama_modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile whose TEMPLATE reproduces the training chat template.

    The Jinja template is rendered with marker messages to recover each role's wrapper (text before
    and after the content) and the generation prompt; the Go template is assembled from those pieces
    and checked by rendering a multi-turn conversation both ways.

    Raises:
        LlamatuneError: If the template is not a per-role wrapper (it cannot be expressed this way).
    """
    wrap = {role: _wrapper(tokenizer, role) for role in ("system", "user", "assistant")}
    gen = _render(tokenizer, [_msg("user", "U")], True)[len(_render(tokenizer, [_msg("user", "U")], False)):]
    check = [_msg("system", "You are careful."), _msg("user", "Hi"), _msg("assistant", "Hello"), _msg("user", "Bye")]
    expected = _render(tokenizer, check, True)
    rebuilt = "".join(wrap[m["role"]][0] + m["content"] + wrap[m["role"]][1] for m in check) + gen
    if rebuilt != expected:
        raise LlamatuneError("the chat template is not a plain per-role wrapper, so it cannot be written as an Ollama "
                             "TEMPLATE exactly; use the GGUF file with llama.cpp, which reads the template from its metadata")
    stop = tokenizer.eos_token

    def go(text: str) -> str:
        return text.replace("{{", "{{ \"{{\" }}")

    template = (
        "{{- if .System }}" + go(wrap["system"][0]) + "{{ .System }}" + go(wrap["system"][1]) + "{{ end }}"
        "{{ range .Messages }}{{ if eq .Role \"user\" }}" + go(wrap["user"][0]) + "{{ .Content }}" + go(wrap["user"][1])
        + "{{ else if eq .Role \"assistant\" }}" + go(wrap["assistant"][0]) + "{{ .Content }}" + go(wrap["assistant"][1])
        + "{{ end }}{{ end }}" + go(gen)
    )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', f'PARAMETER stop "{stop}"']
    default = _default_system(tokenizer, wrap)
    if default:  # the template adds a system message when none is given: Ollama's SYSTEM does the same
        lines.append(f'SYSTEM """{default}"""')
    return "\n".join(lines) + "\n"


def _default_system(tokenizer, wrap) -> str | None:
    alone = _render(tokenizer, [_msg("user", "U")], False)
    head, tail = wrap["system"]
    if alone.startswith(head) and tail in alone[len(head):]:
        return alone[len(head):].split(tail, 1)[0]
    return None


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    from llamatune.data.encode import render_chat

    return render_chat(tokenizer, messages, generation_prompt)


def _wrapper(tokenizer, role: str) -> tuple[str, str]:
    """(text before, text after) the content of one `role` message, measured with a marker."""
    marker = "\u2063LLAMATUNE\u2063"
    context = [_msg("system", "S")] if role != "system" else []
    before = _render(tokenizer, context, False) if context else ""
    text = _render(tokenizer, context + [_msg(role, marker)], False)[len(before):]
    head, _, tail = text.partition(marker)
    return head, tail
