"""Where a model's weights come from, under their Hugging Face names, as float32, a tensor or a block of rows at a
time: a model folder, a base folder with a run's LoRA adapter merged on the fly, or a GGUF file. Merge, export and
the layer-by-layer forward pass (layerwise.py) read weights only through these, so none of them holds a model.

Every source has `names()`, `has(name)`, `shape(name)`, `get(name)`, `rows(name, start, stop)` and `take(name, ids)`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from llamatune.artifacts.gguf_io import GGUFTensors
from llamatune.artifacts.tensors import CHUNK_ELEMENTS, Safetensors

if TYPE_CHECKING:
    import torch


def row_blocks(source, name: str, dtype, align: int = 1) -> Iterator["torch.Tensor"]:
    """The tensor `name` of `source` in `dtype`, as consecutive blocks of about CHUNK_ELEMENTS values (a multiple of
    `align` rows each: whole heads where rows are permuted per head), so that no copy of a large tensor is whole."""
    shape = source.shape(name)
    if len(shape) < 2:
        yield source.get(name).to(dtype)
        return
    step = max(align, CHUNK_ELEMENTS // math.prod(shape[1:]) // align * align)
    for start in range(0, shape[0], step):
        yield source.rows(name, start, start + step).to(dtype)


class FolderWeights:
    """A transformers model folder's weights (safetensors)."""

    def __init__(self, folder: Path):
        self.files = Safetensors.folder(folder)

    def names(self) -> list[str]:
        return self.files.names()

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files.shape(name)

    def get(self, name: str) -> "torch.Tensor":
        return self.files.read(name).float()

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        return self.files.rows(name, start, stop).float()

    def take(self, name: str, ids: Iterable[int]) -> "torch.Tensor":
        return self.files.take(name, ids).float()


class MergedWeights(FolderWeights):
    """A base folder's weights with a run's LoRA deltas (lora.Deltas) added: base + adapter merged on the fly."""

    def __init__(self, folder: Path, deltas):
        super().__init__(folder)
        self.deltas = deltas

    def get(self, name: str) -> "torch.Tensor":
        return self.deltas.merged(name, super().get(name))

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        return self.deltas.merged_rows(name, super().rows(name, start, stop), start)

    def take(self, name: str, ids: Iterable[int]) -> "torch.Tensor":
        if name in self.deltas:  # never for the embeddings, which plain LoRA does not adapt
            import torch

            return torch.cat([self.rows(name, i, i + 1) for i in ids])
        return super().take(name, ids)


class Nf4Weights:
    """Another source's weights with every decoder-layer projection rounded to nf4 and back by bitsandbytes' own
    quantizer (block size 64, as transformers' 4-bit loading uses): the base a QLoRA adapter was trained on."""

    def __init__(self, inner, stored_dtype: str, double_quant: bool):
        self.inner, self.stored, self.double_quant = inner, stored_dtype, double_quant

    def __getattr__(self, name):  # names, has, shape, rows, take: the inner source's
        return getattr(self.inner, name)

    def get(self, name: str) -> "torch.Tensor":
        import torch
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        weight = self.inner.get(name)
        if ".layers." not in name or weight.ndim != 2:  # norms, embeddings and the head stay as they are
            return weight
        packed, state = quantize_4bit(weight.to(getattr(torch, self.stored)), blocksize=64, quant_type="nf4",
                                      compress_statistics=self.double_quant)
        return dequantize_4bit(packed, state).float()


class GGUFWeights:
    """A Llama GGUF's weights, dequantized, under their Hugging Face names (Q/K rows back in Hugging Face's order)."""

    def __init__(self, path: Path, config):
        from llamatune.artifacts.export import hf_to_gguf_names

        self.file = GGUFTensors(path)
        self.config = config
        self.map = {hf: g for hf, g in hf_to_gguf_names(config.num_hidden_layers).items() if g in self.file}

    def names(self) -> list[str]:
        return list(self.map)

    def has(self, name: str) -> bool:
        return name in self.map

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(self.map[name])

    def get(self, name: str) -> "torch.Tensor":
        return self._hf(name, self.file.read(self.map[name]))

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        return self._hf(name, self.file.rows(self.map[name], start, stop))

    def take(self, name: str, ids: Iterable[int]) -> "torch.Tensor":
        return self._hf(name, self.file.take(self.map[name], ids))

    def _hf(self, name: str, array) -> "torch.Tensor":
        import torch

        from llamatune.artifacts.export import unpermute_rotary

        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            array = unpermute_rotary(array, array.shape[0] // self._head_dim())
        return torch.from_numpy(array).float()

    def _head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
