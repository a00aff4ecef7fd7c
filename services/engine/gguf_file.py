"""A GGUF file (llama.cpp's one-file checkpoint) parsed with the ``gguf`` package.

Glossary:
- metadata: the file's key/value section (``general.architecture``, ``llama.block_count``,
  ``tokenizer.ggml.tokens``, ...), read here into plain Python values.
- ne: GGUF's tensor dimensions, innermost first; a PyTorch ``[out, in]`` matrix has
  ``ne = [in, out]``. ``GGUFTensorInfo.shape`` is already in PyTorch order (reversed ne).
- quantization block: a quantized row is stored as blocks of 32 values (Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0) or 256 values (the K-quants Q2_K..Q6_K), each block with its own scale(s);
  ``gguf.quants.dequantize`` turns rows of blocks back into floats.

Parsing the metadata with ``gguf.GGUFReader`` costs seconds for a 49k-token vocabulary
(one numpy view per string), and the engine opens a model three times (weights, tokenizer,
fingerprint), so ``read_gguf`` memoizes the parsed, immutable ``GGUFFile`` per (path, size,
mtime): a changed file is parsed again.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.engine.checkpoint import CheckpointError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
# tensor types dequantized on load (gguf.quants.dequantize implements each of them)
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file and how it is stored."""

    name: str  # GGUF tensor name, e.g. "blk.0.attn_q.weight"
    type_name: str  # GGML type name, e.g. "Q4_1" (gguf.GGMLQuantizationType member name)
    shape: tuple[int, ...]  # PyTorch order (outermost first): reversed ne
    offset: int  # absolute byte offset of the tensor's data in the file
    n_bytes: int  # bytes of stored data


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file: metadata, tensor directory, data start."""

    path: Path  # the file
    metadata: dict[str, Any] = field(hash=False)  # key -> str | int | float | bool | list
    tensors: dict[str, GGUFTensorInfo] = field(hash=False)  # GGUF tensor name -> info, file order
    data_offset: int  # first byte of the tensor data section (= length of the header)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """Metadata value ``key``; CheckpointError naming the key and the file when absent."""
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing")
        return self.metadata[key]


def is_gguf_path(path: str | Path) -> bool:
    """True when ``path`` names a GGUF file (by its suffix; the file is checked when opened)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at ``path`` (memoized while the file is unchanged)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open GGUF file ({e.strerror})") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file (a GGUF model is one .gguf file)")
    return _read_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    import gguf  # the format's own library; imported here so safetensors-only users never pay for it

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # ValueError for a bad version / tensor type, IndexError when truncated
        raise CheckpointError(f"{path}: corrupt or unsupported GGUF file ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    metadata = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise CheckpointError(f"{path}: tensor {t.name!r} ends at byte {end}, past the end of the file ({size})")
        tensors[t.name] = GGUFTensorInfo(name=t.name, type_name=t.tensor_type.name,
                                         shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                                         offset=int(t.data_offset), n_bytes=int(t.n_bytes))
    return GGUFFile(path=Path(path), metadata=metadata, tensors=tensors, data_offset=int(reader.data_offset))


def check_tensor_types(file: GGUFFile) -> None:
    """CheckpointError naming the first tensor whose type is not dequantized here."""
    for info in file.tensors.values():
        if info.type_name not in SUPPORTED_TENSOR_TYPES:
            raise CheckpointError(f"{file.path}: tensor {info.name!r} has GGML type {info.type_name}, which is not "
                                  f"supported; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")


def dequantize(data: np.memmap, info: GGUFTensorInfo) -> torch.Tensor:
    """Tensor ``info`` read from ``data`` (the file as uint8) -> float32 [PyTorch shape].

    F32 is returned as stored; every other type goes through ``gguf.quants.dequantize``,
    which computes in float32 (F16 and BF16 widen exactly; quantized blocks give d * q + m).
    """
    import gguf

    qtype = gguf.GGMLQuantizationType[info.type_name]
    raw = data[info.offset:info.offset + info.n_bytes]
    byte_shape = gguf.quants.quant_shape_to_byte_shape(info.shape, qtype)
    values = gguf.quants.dequantize(np.asarray(raw).reshape(byte_shape), qtype)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file mapping
        values = values.copy()
    out = torch.from_numpy(values)
    if tuple(out.shape) != info.shape:
        raise CheckpointError(f"tensor {info.name!r}: dequantized shape {list(out.shape)} != {list(info.shape)}")
    return out


def gguf_fingerprint(path: str | Path, sample_bytes: int = 1 << 16) -> str:
    """sha256 hex of a GGUF file's header (every metadata key and value, every tensor's name,
    type, shape and offset) and of the first and last ``sample_bytes`` of its tensor data.

    Stable for the same file; differs whenever the metadata (tokenizer included) or the
    tensor directory differs, and through the data sample for files that share both.
    """
    file = read_gguf(path)
    with open(file.path, "rb") as fh:
        header = fh.read(file.data_offset)
        size = fh.seek(0, os.SEEK_END)
        fh.seek(file.data_offset)
        head = fh.read(sample_bytes)
        fh.seek(max(file.data_offset, size - sample_bytes))
        tail = fh.read(sample_bytes)
    digest = hashlib.sha256(b"gguf")
    for part in (header, head + tail):
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no ambiguity between parts
        digest.update(part)
    return digest.hexdigest()
