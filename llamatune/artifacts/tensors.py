"""Streaming model I/O: read a model's tensors one at a time from safetensors shards (here) or a GGUF file
(gguf_io.py), write safetensors shards (with their index) or a GGUF file one tensor at a time. Conversion, merge and export all go through here, so
their peak memory is bounded by the largest tensor (or a chunk of its rows) plus a fixed overhead, never by the
size of the model.

Reads are plain reads into a buffer owned by the returned tensor, not memory maps: pages of a mapped file count
in the process's resident memory while they stay mapped, so reading a 16 GB model through `safe_open` or
`GGUFReader`'s memmap would show a 16 GB peak even though each tensor is dropped after use. The GGUF header and
tensor table are still parsed by the `gguf` package (its memmap then only touches those first pages).

The safetensors layout (an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the data) is simple enough to write directly; the `safetensors` package can only save a whole
dict of tensors at once, which is the copy this module exists to avoid.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

# Rows are converted in chunks of about this many elements: a chunk's float32 copy and the dequantizer's
# temporaries stay in the tens of MB whatever the tensor.
CHUNK_ELEMENTS = 1 << 22
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
ST_INDEX = "model.safetensors.index.json"


def _torch_dtype(code: str):
    import torch

    return getattr(torch, _ST_NAMES[code])


def _st_code(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, n in _ST_NAMES.items() if n == name)


@dataclass(frozen=True)
class _Entry:
    file: Path
    code: str  # safetensors dtype code
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    stop: int


def read_bytes(file: Path, start: int, stop: int) -> bytearray:
    """Bytes [start, stop) of `file`, read into a fresh buffer (plain reads: nothing stays mapped)."""
    buf = bytearray(stop - start)
    with open(file, "rb") as f:
        f.seek(start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{file}: ends at byte {start + done}, before the tensor data it announces (cut short?)")
            done += n
    return buf


class TensorTable:
    """Names and shapes of a file's tensors (`_entries`: name -> an entry with `.shape`), in the file's order; the
    readers here and in gguf_io.py add how a tensor is read."""

    _entries: dict

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape


class Safetensors(TensorTable):
    """The tensors of one model's safetensors files (model.safetensors, or the shards its index names), read one at
    a time; names keep the files' order."""

    def __init__(self, files: Iterable[Path]):
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict = {}
        for file in files:
            self._parse(Path(file))

    @classmethod
    def folder(cls, folder: Path) -> "Safetensors":
        """The weights of a transformers model folder.

        Raises:
            OSError: If the folder has no safetensors weights, or its index names a missing file.
        """
        folder = Path(folder)
        index = folder / ST_INDEX
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"].values()
            return cls(folder / n for n in dict.fromkeys(names))
        if (folder / "model.safetensors").is_file():
            return cls([folder / "model.safetensors"])
        raise OSError(f"{folder}: no model.safetensors or {ST_INDEX}")

    def _parse(self, file: Path) -> None:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise OSError(f"{file}: too short to be a safetensors file")
            (size,) = struct.unpack("<Q", head)
            if size > 100 * 2**20:
                raise OSError(f"{file}: a header of {size} bytes; not a safetensors file")
            header = json.loads(f.read(size))
        base, end = 8 + size, file.stat().st_size
        self.metadata.update(header.pop("__metadata__", None) or {})
        for name, info in header.items():
            start, stop = (base + int(o) for o in info["data_offsets"])
            if stop > end:
                raise OSError(f"{file}: tensor {name} ends at byte {stop}, past the end of the file ({end}); cut short")
            self._entries[name] = _Entry(file, info["dtype"], tuple(int(n) for n in info["shape"]), start, stop)

    def dtype(self, name: str) -> "torch.dtype":
        return _torch_dtype(self._entries[name].code)

    def nbytes(self, name: str) -> int:
        e = self._entries[name]
        return e.stop - e.start

    def read(self, name: str) -> "torch.Tensor":
        """The whole tensor, in its stored dtype (a fresh copy)."""
        e = self._entries[name]
        return self._tensor(read_bytes(e.file, e.start, e.stop), e.code, e.shape)

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) of the tensor (its first dimension)."""
        e = self._entries[name]
        row = (e.stop - e.start) // max(e.shape[0], 1)
        stop = min(stop, e.shape[0])
        return self._tensor(read_bytes(e.file, e.start + start * row, e.start + stop * row), e.code,
                            (stop - start, *e.shape[1:]))

    def take(self, name: str, ids: Iterable[int]) -> "torch.Tensor":
        """The rows `ids` (e.g. the embeddings of some tokens), each read on its own."""
        import torch

        picked = [self.rows(name, i, i + 1) for i in ids]
        return torch.cat(picked) if picked else self.rows(name, 0, 0)

    @staticmethod
    def _tensor(buf: bytearray, code: str, shape: tuple[int, ...]) -> "torch.Tensor":
        import torch

        dtype = _torch_dtype(code)
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class _Deferred:
    """One tensor of a Safetensors, read when transformers' loader indexes it (`t[...]`), as its own mmap slices are."""

    def __init__(self, files: "Safetensors", name: str):
        self.files, self.name = files, name

    def __getitem__(self, key) -> "torch.Tensor":
        return self.files.read(self.name)[key]


def deferred_state_dict(files: "Safetensors") -> dict:
    """A state dict whose tensors are read (plain file reads) one at a time as the model loads them: the loader then holds
    the model being built and one source tensor, where its memory maps keep every stored page of the checkpoint
    resident until the load ends (a 16 GB bf16 model loaded to 4 bits would show a 16 GB peak)."""
    return {name: _Deferred(files, name) for name in files.names()}


def shard_plan(entries: list[tuple[str, "torch.dtype", tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Indexes of `entries` per shard, in order: a new shard starts when the next tensor would pass the limit
    (a tensor larger than the limit gets a shard of its own), as transformers' save_pretrained splits them."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(entries):
        n = math.prod(shape) * _itemsize(dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a model's weights as model.safetensors, or as model-0000i-of-0000n.safetensors shards with
    model.safetensors.index.json, taking the tensors one at a time in the order planned.

    Each shard's header is written first from the plan (names, dtypes, shapes), then the tensors' bytes follow as
    they come, so nothing but the tensor being written is in memory.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, "torch.dtype", tuple[int, ...]]],
                 max_shard_bytes: int = 2 * 10**9, metadata: dict | None = None):
        self.folder = Path(folder)
        self._entries = entries
        self._meta = {"format": "pt", **(metadata or {})}
        self._shards = shard_plan(entries, max_shard_bytes)
        n = len(self._shards)
        self._files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into entries of the next tensor to write
        self._shard = -1
        self._out = None
        self._left = 0  # bytes of the open shard still to come

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        """Appends the next tensor of the plan.

        Raises:
            ValueError: If `name`, its dtype or its shape is not the plan's next entry (a bug in the caller).
        """
        want, dtype, shape = self._entries[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want, dtype, tuple(shape)):
            raise ValueError(f"expected {want} {dtype} {tuple(shape)}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks: Iterable["torch.Tensor"]) -> None:
        """Appends the next tensor of the plan as consecutive blocks of its rows (in its planned dtype), so a large
        tensor need never exist whole.

        Raises:
            ValueError: If `name` is not the plan's next entry, a block's dtype is not planned, or the bytes written
                are not the tensor's (bugs in the caller).
        """
        want, dtype, shape = self._entries[self._next]
        if name != want:
            raise ValueError(f"expected {want}, got {name}")
        if self._out is None or self._next not in self._shards[self._shard]:
            self._open_next_shard()
        done = 0
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"{name}: a block in {chunk.dtype}, planned {dtype}")
            data = chunk.detach().contiguous().reshape(-1)
            if data.numel():
                raw = data.view(torch_uint8()).numpy()
                self._out.write(memoryview(raw))
                done += raw.nbytes
        if done != math.prod(shape) * _itemsize(dtype):
            raise ValueError(f"{name}: wrote {done} bytes, planned {math.prod(shape) * _itemsize(dtype)}")
        self._left -= done
        self._next += 1
        if self._next == len(self._entries) or self._next not in self._shards[self._shard]:
            self._close_shard()

    def _open_next_shard(self) -> None:
        self._shard += 1
        header, offset = {}, 0
        for i in self._shards[self._shard]:
            name, dtype, shape = self._entries[i]
            n = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _st_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {k: str(v) for k, v in self._meta.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._out = open(self.folder / self._files[self._shard], "wb")
        self._out.write(struct.pack("<Q", len(text)) + text)
        self._left = offset

    def _close_shard(self) -> None:
        if self._left:
            raise ValueError(f"{self._files[self._shard]}: {self._left} bytes missing")
        self._out.close()
        self._out = None

    def close(self) -> int:
        """Finishes the files (the index when there are shards); returns the total bytes of tensor data.

        Raises:
            ValueError: If tensors of the plan were never written.
        """
        if self._next != len(self._entries):
            raise ValueError(f"{len(self._entries) - self._next} planned tensors were not written")
        total = sum(math.prod(shape) * _itemsize(dtype) for _, dtype, shape in self._entries)
        if len(self._files) > 1:
            weight_map = {self._entries[i][0]: self._files[s] for s, shard in enumerate(self._shards) for i in shard}
            (self.folder / ST_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                           indent=2) + "\n")
        return total

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def torch_uint8():
    import torch

    return torch.uint8
