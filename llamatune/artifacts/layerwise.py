"""Logits of a Llama model computed one decoder layer at a time, each layer's weights read when it runs and dropped
after: the parity check of a streamed merge and the quality check of a large export see the same numbers the whole
model would give (transformers' own decoder layer does the arithmetic), with the memory of one layer.

All prompts go through layer i before layer i+1 is read, so each weight is read once. Only the embedding rows of
the prompts' tokens are read, and the output head is applied a block of vocabulary rows at a time. Computed in
float32 whatever the weights' stored dtype: what is compared is the weights, not a dtype's arithmetic.

The weights come from a source of weights.py (a model folder, a base with a run's adapter merged on the fly, a
GGUF). `hooks(i, layer)` may change layer i before it runs (the unmerged LoRA path, a 4-bit round trip).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from llamatune.artifacts.tensors import CHUNK_ELEMENTS

if TYPE_CHECKING:
    import torch

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def lora_hooks(deltas) -> Callable:
    """hooks() that add each adapted projection's unmerged LoRA output, scale · (x Aᵀ) Bᵀ, to the base output."""

    def hooks(i: int, layer) -> None:
        for module, linear in layer.named_modules():
            pair = deltas.pairs.get(f"model.layers.{i}.{module}.weight")
            if pair is not None:
                linear.register_forward_hook(lambda m, args, out, pair=pair: out + pair.forward(args[0]))

    return hooks


def logits(config, weights, prompts: list[list[int]], hooks: Callable | None = None,
           tick: Callable[[], None] = lambda: None) -> list["torch.Tensor"]:
    """Float32 logits [len(prompt), vocab] of every prompt, the model run one decoder layer at a time.

    Args: as hidden_states.
    """
    return _head(config, weights, hidden_states(config, weights, prompts, hooks, tick))


def hidden_states(config, weights, prompts: list[list[int]], hooks: Callable | None = None,
                  tick: Callable[[], None] = lambda: None) -> list["torch.Tensor"]:
    """Float32 final hidden states [len(prompt), hidden] (after the last norm) of every prompt, the model run one
    decoder layer at a time.

    Args:
        config: The model's transformers config (a Llama-architecture model).
        weights: The weight source (see the module's docstring).
        hooks: Called with (layer index, decoder layer) after its weights are loaded, before it runs.
        tick: Called after each layer (progress).
    """
    import copy

    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # causal attention with no mask: one unpadded prompt at a time
    vocab = sorted({t for p in prompts for t in p})
    row = {t: i for i, t in enumerate(vocab)}
    embedded = weights.take(EMBED, vocab)
    hidden = [embedded[[row[t] for t in p]].unsqueeze(0) for p in prompts]
    del embedded
    rotary = LlamaRotaryEmbedding(config)
    with torch.no_grad():
        cos_sin = [rotary(h, torch.arange(h.shape[1]).unsqueeze(0)) for h in hidden]
        for i in range(config.num_hidden_layers):
            with torch.device("meta"):
                layer = LlamaDecoderLayer(config, i)
            layer.load_state_dict({k: weights.get(f"model.layers.{i}.{k}") for k in layer.state_dict()},
                                  strict=True, assign=True)
            layer.eval()
            if hooks is not None:
                hooks(i, layer)
            hidden = [_first(layer(h, position_embeddings=pe)) for h, pe in zip(hidden, cos_sin)]
            del layer
            tick()
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict({"weight": weights.get(NORM)})
        return [norm(h)[0] for h in hidden]


def _first(out):
    """A decoder layer returns its hidden states alone or first in a tuple, by transformers version."""
    return out[0] if isinstance(out, tuple) else out


def _head(config, weights, hidden: list["torch.Tensor"]) -> list["torch.Tensor"]:
    """hidden @ headᵀ a block of vocabulary rows at a time (the head of an 8B model is 2 GB in float32)."""
    import torch

    head = HEAD if weights.has(HEAD) and not getattr(config, "tie_word_embeddings", False) else EMBED
    n = config.vocab_size
    out = [torch.empty(h.shape[0], n) for h in hidden]
    step = max(1, CHUNK_ELEMENTS // config.hidden_size)
    for start in range(0, n, step):
        block = weights.rows(head, start, start + step)
        for h, o in zip(hidden, out):
            o[:, start:start + block.shape[0]] = h @ block.T
    return out


def compare(got: list["torch.Tensor"], reference: list["torch.Tensor"]) -> dict:
    """max |Δlogit|, mean KL(reference ‖ got) per position, and greedy-token agreement of two logit lists."""
    import torch

    worst, kls, agree, total = 0.0, [], 0, 0
    for g, r in zip(got, reference):
        worst = max(worst, float((g - r).abs().max()))
        kls.append(float(torch.nn.functional.kl_div(g.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                                    reduction="none").sum(-1).mean()))
        agree += int((g.argmax(-1) == r.argmax(-1)).sum())
        total += r.shape[0]
    return {"max_abs_logit": worst, "mean_kl": sum(kls) / max(len(kls), 1), "greedy_agreement": agree / max(total, 1)}
