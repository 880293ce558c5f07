"""GGUF files tensor by tensor (the other half of tensors.py's streaming model I/O): read a GGUF's tensors dequantized
a block of rows at a time, and write a GGUF whose tensors arrive one at a time, in chunks.

The header, metadata and tensor table are parsed and written by the `gguf` package; tensor bytes are read with
plain file reads (tensors.read_bytes) and dequantized by `gguf.quants`, as transformers' GGUF loader does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from llamatune.artifacts.tensors import CHUNK_ELEMENTS, TensorTable, read_bytes

if TYPE_CHECKING:
    import numpy as np

@dataclass(frozen=True)
class _GGUFEntry:
    qtype: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy (row-major) order: [rows, columns]
    start: int
    nbytes: int


class GGUFTensors(TensorTable):
    """The tensors of a GGUF file, dequantized to float32 one tensor (or a few rows of one) at a time; names and
    shapes are the file's own (llama.cpp names, numpy row-major order, Q/K rows in llama.cpp's rotary order)."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        reader = gguf.GGUFReader(str(path))
        self.fields = reader.fields
        self._entries = {t.name: _GGUFEntry(t.tensor_type, tuple(int(n) for n in reversed(t.shape)),
                                            int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
        del reader  # its memmap: nothing past the header was touched

    def qtype(self, name: str) -> str:
        return self._entries[name].qtype.name

    def read(self, name: str) -> "np.ndarray":
        """The whole tensor as float32 [rows, columns] (1-D for vectors)."""
        return self.rows(name, 0, self._rows(name))

    def _rows(self, name: str) -> int:
        shape = self._entries[name].shape
        return shape[0] if len(shape) > 1 else 1

    def rows(self, name: str, start: int, stop: int) -> "np.ndarray":
        """Rows [start, stop) as float32, dequantized chunk by chunk into one array."""
        import numpy as np
        from gguf.quants import dequantize

        e = self._entries[name]
        n_rows = self._rows(name)
        stop = min(stop, n_rows)
        row_bytes = e.nbytes // n_rows
        cols = math.prod(e.shape) // n_rows
        out = np.empty((stop - start, cols), dtype=np.float32)
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        for r in range(start, stop, step):
            end = min(stop, r + step)
            raw = np.frombuffer(read_bytes(self.path, e.start + r * row_bytes, e.start + end * row_bytes), np.uint8)
            out[r - start:end - start] = dequantize(raw.reshape(end - r, row_bytes), e.qtype).reshape(end - r, cols)
        return out if len(e.shape) > 1 else out.reshape(-1)

    def take(self, name: str, ids: Iterable[int]) -> "np.ndarray":
        import numpy as np

        picked = [self.rows(name, i, i + 1) for i in ids]
        return np.concatenate(picked) if picked else self.rows(name, 0, 0)


class GGUFStream:
    """A GGUF file written tensor by tensor: every tensor's name, shape and type is declared first (`declare`), then
    `begin` writes the header, metadata and tensor table, and `write` appends each tensor's bytes, in declared
    order, in as many chunks as the caller likes (rows quantized a chunk at a time never exist whole)."""

    def __init__(self, path: Path, arch: str = "llama"):
        import gguf

        self.writer = gguf.GGUFWriter(str(path), arch)
        self._order: list[tuple[str, int]] = []  # (name, bytes)
        self._next = 0
        self._alignment = self.writer.data_alignment

    def declare(self, name: str, shape: tuple[int, ...], qtype: str) -> None:
        """Announces a tensor: `shape` in numpy order of its float values, `qtype` a GGML type name (F32, F16, Q8_0...)."""
        import gguf
        import numpy as np
        from gguf.quants import quant_shape_to_byte_shape

        kind = gguf.GGMLQuantizationType[qtype]
        numpy_type = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(kind)
        # F32 and F16 are numpy dtypes the writer knows; BF16 and the block types are declared as raw bytes.
        byte_shape = tuple(shape) if numpy_type else tuple(quant_shape_to_byte_shape(shape, kind))
        nbytes = math.prod(byte_shape) * (np.dtype(numpy_type).itemsize if numpy_type else 1)
        self.writer.add_tensor_info(name, byte_shape, np.dtype(numpy_type or np.uint8), nbytes,
                                    raw_dtype=None if numpy_type else kind)
        self._order.append((name, nbytes))

    def begin(self) -> None:
        """Writes everything before the tensor data (the metadata added to `writer` until now included)."""
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        self._fout = self.writer.fout[0] if isinstance(self.writer.fout, list) else self.writer.fout
        self._pad()

    def write(self, name: str, chunks: Iterator["np.ndarray"]) -> None:
        """The bytes of the next declared tensor (quantized blocks, or F32/F16 values), chunk after chunk."""
        want, nbytes = self._order[self._next]
        if name != want:
            raise ValueError(f"expected tensor {want}, got {name}")
        done = 0
        for chunk in chunks:
            raw = memoryview(chunk.reshape(-1).view("uint8"))
            self._fout.write(raw)
            done += raw.nbytes
        if done != nbytes:
            raise ValueError(f"{name}: wrote {done} bytes, declared {nbytes}")
        self._pad()
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} declared tensors were not written")
        self._fout.flush()
        self.writer.close()

    def _pad(self) -> None:
        self._fout.write(b"\0" * (-self._fout.tell() % self._alignment))
