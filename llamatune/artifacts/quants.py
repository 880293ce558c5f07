"""GGUF weight quantization in NumPy, byte for byte what llama.cpp's own quantizer writes without an
importance matrix, plus the per-tensor type mix its quantizer picks for a Llama model.

`quantize` returns the packed blocks in the layout `gguf.GGUFWriter.add_tensor(name, packed,
raw_shape=packed.shape, raw_dtype=...)` accepts; `dequantize` reads them back (through gguf-py);
`tensor_types` says which type each tensor of a Llama GGUF gets for a llama.cpp file type.

Large tensors are processed in row chunks small enough to stay in the CPU caches, so memory stays a few
copies of one chunk whatever the tensor's size; chunks run on threads (NumPy releases the GIL inside its
array loops).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import numpy as np

from llamatune.artifacts import kquants, quant_blocks
from llamatune.errors import LlamatuneError

# type -> (weights per block, bytes per block, block kernel (blocks, weights) float32 -> (blocks, bytes) uint8)
_TYPES = MappingProxyType({
    "Q4_0": (32, 18, quant_blocks.q4_0), "Q4_1": (32, 20, quant_blocks.q4_1),
    "Q5_0": (32, 22, quant_blocks.q5_0), "Q5_1": (32, 24, quant_blocks.q5_1),
    "Q8_0": (32, 34, quant_blocks.q8_0), "Q4_K": (256, 144, kquants.q4_k),
    "Q5_K": (256, 176, kquants.q5_k), "Q6_K": (256, 210, kquants.q6_k),
})
QTYPES = tuple(_TYPES)
# the K-quant searches make ~350 passes over each chunk: 256K weights (1 MiB of float32) keep the chunk and its
# scratch arrays in the L2/L3 caches, while each NumPy call has enough elements to amortize its overhead (measured:
# 128K weights ran Q4_K about 25% slower, 1M not faster)
CHUNK_WEIGHTS = 1 << 18


def block_layout(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a quantized type, e.g. Q4_K -> (256, 144).

    Raises:
        LlamatuneError: For a type this module does not quantize.
    """
    block, nbytes, _ = _TYPES[_kind(qtype)]
    return block, nbytes


def block_size(qtype: str) -> int:
    """Weights per block of a GGML type name (F32/F16: 1)."""
    return 1 if qtype in ("F32", "F16") else block_layout(qtype)[0]


def _kind(qtype: str) -> str:
    kind = str(qtype).upper()
    if kind not in _TYPES:
        raise LlamatuneError(f"quantization type {qtype!r} is not supported; choose one of {', '.join(QTYPES)}")
    return kind


def quantize(data: np.ndarray, qtype: str, *, threads: int | None = None) -> np.ndarray:
    """Quantizes a 2-D float tensor into GGML blocks, as llama.cpp's reference quantizer does.

    Args:
        data: (rows, cols) floats, cols being GGML's ne[0]; converted to float32 chunk by chunk.
        qtype: One of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (any case).
        threads: Worker threads over row chunks; default: the CPUs this process may use.

    Returns:
        (rows, cols // block * bytes_per_block) uint8, each row its blocks in order.

    Raises:
        LlamatuneError: For an unknown type, a tensor that is not 2-D, cols not a multiple of the block size,
            or NaN / infinite values.
    """
    kind = _kind(qtype)
    block, nbytes, kernel = _TYPES[kind]
    if np.ndim(data) != 2:
        raise LlamatuneError(f"quantize takes a 2-D (rows, cols) tensor, got shape {np.shape(data)}")
    rows, cols = data.shape
    if cols % block:
        raise LlamatuneError(f"{kind} needs a row length that is a multiple of {block}; this tensor has {cols} "
                             "columns (llama.cpp falls back to another type for such tensors: see tensor_types)")
    out = np.empty((rows, cols // block * nbytes), np.uint8)
    step = max(1, CHUNK_WEIGHTS // max(cols, 1))

    def run(start: int) -> None:
        chunk = np.ascontiguousarray(data[start:start + step], dtype=np.float32)  # (r, cols)
        if not np.isfinite(chunk).all():
            raise LlamatuneError(f"cannot quantize to {kind}: the tensor holds NaN or infinite values "
                                 f"(rows {start}..{start + len(chunk) - 1})")
        out[start:start + len(chunk)] = kernel(chunk.reshape(-1, block)).reshape(len(chunk), -1)

    starts = range(0, rows, step)
    workers = min(threads or _cpus(), len(starts))
    if workers <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))  # list(): re-raises a worker's error here
    return out


def _cpus() -> int:
    # the CPUs this process may run on (a container's or taskset's limit), where the OS tells
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def dequantize(packed: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """The float32 (rows, cols) tensor that GGML reads from `quantize`'s blocks (gguf-py's dequantizer).

    Raises:
        LlamatuneError: For an unknown type or `packed` not holding exactly `shape`'s blocks.
    """
    import gguf

    kind = _kind(qtype)
    block, nbytes, _ = _TYPES[kind]
    rows, cols = shape
    if cols % block or np.shape(packed) != (rows, cols // block * nbytes):
        raise LlamatuneError(f"{np.shape(packed)} bytes do not hold a {kind} tensor of shape {tuple(shape)}")
    return gguf.quants.dequantize(np.asarray(packed, np.uint8), gguf.GGMLQuantizationType[kind]).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------
# Type mix. llama.cpp's quantizer (llama-quant.cpp) picks each tensor's type in four stages; for a dense Llama
# without an importance matrix and for the file types below, they come down to these rules:
#  1. Only tensors with more than one row whose names end in "weight" are quantized, and never a
#     "*_norm.weight"; everything else keeps its input type (F32 here).
#  2. The file type names a base type (q4_k_m -> Q4_K, ...). The output head, and the token embeddings when
#     they are tied to it (no output.weight), get Q8_0 if their row length does not divide into base-type
#     blocks, else Q6_K unless the base is already Q8_0.
#  3. The "more bits" layers: use_more_bits(i, n) holds for the first n/8 and last n/8 layers and every third
#     in between. attn_v tensors (counted in llama.cpp's tensor order) get Q6_K there for q4_k_m / q5_k_m,
#     and Q5_K for the first four with q4_k_s; ffn_down gets Q6_K there for q4_k_m / q5_k_m, and Q5_K in
#     layers below n/8 with q4_k_s. Llama-2/3-70B (80 layers, grouped-query attention) lifts a Q4_K attn_v
#     to Q5_K.
#  4. A row length that does not divide into the chosen type's blocks demotes Q4_K -> Q5_0, Q5_K -> Q5_1,
#     Q6_K -> Q8_0 (32-weight types stay), and to F16 if even that does not divide.
# ---------------------------------------------------------------------------------------------------------

FTYPES = MappingProxyType({
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K",
})
_DEMOTE = MappingProxyType({"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"})
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_types(names_and_shapes: list[tuple[str, tuple[int, ...]]], ftype: str, n_layers: int,
                 tied: bool) -> dict[str, str]:
    """The GGML type llama.cpp's quantizer gives each tensor of a Llama GGUF for a file type.

    Args:
        names_and_shapes: GGUF tensor names with their shapes in NumPy order (rows, cols), cols = ne[0].
        ftype: One of q4_0, q4_1, q5_0, q5_1, q8_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k.
        n_layers: The model's block count.
        tied: Whether the token embeddings double as the output head (the list has no output.weight).

    Returns:
        name -> type name ("Q4_K", "Q6_K", "Q8_0", "F16", "F32", ...).

    Raises:
        LlamatuneError: For an unknown file type, or `tied` contradicting the presence of output.weight.
    """
    key = str(ftype).lower()
    if key not in FTYPES:
        raise LlamatuneError(f"file type {ftype!r} is not supported; choose one of {', '.join(FTYPES)}")
    names = [name for name, _ in names_and_shapes]
    if tied == ("output.weight" in names):
        raise LlamatuneError(f"tied={tied} but output.weight is {'present' if tied else 'absent'}: llama.cpp treats "
                             "the embeddings as tied exactly when the file has no output.weight")
    shapes = dict(names_and_shapes)
    big_gqa = n_layers == 80 and _rows(shapes, "blk.0.attn_q.weight") != _rows(shapes, "blk.0.attn_k.weight")
    n_attn_v = sum(1 for name in names if "attn_v.weight" in name)
    seen = {"attn_v": 0, "ffn_down": 0}
    types = {}
    for name in sorted(names, key=_loader_order):  # llama.cpp's counters advance in this order
        shape = shapes[name]
        if not _quantized(name, shape):
            types[name] = "F32"
            continue
        role = _role(name, tied)
        if role in seen:
            qtype = _more_bits(key, role, seen[role], n_attn_v if role == "attn_v" else n_layers, big_gqa)
            seen[role] += 1
        elif role == "head":
            base = FTYPES[key]
            qtype = "Q8_0" if shape[-1] % block_size(base) or base == "Q8_0" else "Q6_K"
        else:
            qtype = FTYPES[key]
        types[name] = _fitting(qtype, shape[-1])
    return {name: types[name] for name in names}


def _rows(shapes: dict, name: str):
    return shapes[name][0] if name in shapes else None


def _loader_order(name: str) -> tuple[int, str]:
    # llama.cpp's loader keeps tensors sorted by layer number (non-layer tensors first), then by name
    match = _LAYER.match(name)
    return (int(match.group(1)) if match else -1, name)


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:  # GGML counts dimensions up to its last non-1 one
        dims.pop(0)
    return len(dims) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _role(name: str, tied: bool) -> str:
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "head"
    if "attn_qkv.weight" in name or "attn_kv_b.weight" in name:
        raise LlamatuneError(f"{name}: fused attention tensors are not part of a Llama GGUF; tensor_types "
                             "follows llama.cpp's rules for Llama models only")
    if "attn_v.weight" in name:
        return "attn_v"
    return "ffn_down" if "ffn_down" in name else "other"  # llama.cpp matches any ffn_down* name


def _more_bits(ftype: str, role: str, i: int, n: int, big_gqa: bool) -> str:
    base = FTYPES[ftype]
    if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return "Q6_K"
    if ftype == "q4_k_s" and (i < 4 if role == "attn_v" else i < n // 8):
        return "Q5_K"
    if role == "attn_v" and big_gqa and base == "Q4_K":
        return "Q5_K"
    return base


def _fitting(qtype: str, cols: int) -> str:
    if cols % block_size(qtype) == 0:
        return qtype
    qtype = _DEMOTE.get(qtype, qtype)
    return qtype if cols % block_size(qtype) == 0 else "F16"
