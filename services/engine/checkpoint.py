"""Reading Hugging Face safetensors checkpoints, with errors that name the broken file.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` whose ``weight_map`` points at shard files. Tensors are
read lazily through ``safetensors.safe_open`` (memory-mapped, never pickle).

The fingerprint identifies a model for the shared prefix cache: sha256 over the bytes of
``config.json`` and the JSON header of every safetensors file (names, dtypes, shapes,
offsets and ``__metadata__``; not the tensor data, so it costs a few reads).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

from dataclasses import dataclass

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are in a safetensors file (row-major, little-endian)."""

    file: Path  # the safetensors file
    offset: int  # first byte of the tensor's data, from the start of the file
    nbytes: int  # length of the data in bytes
    dtype: torch.dtype  # stored dtype
    shape: tuple[int, ...]  # stored shape


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file, or holds a file or tensor that does not fit."""


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of the checkpoint at ``path``, sorted by name."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: not found (a checkpoint folder needs config.json)")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index, expected {{'weight_map': {{name: file}}}} ({e!r})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: references missing shard file(s) {missing}")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (no *.safetensors files)")
    return files


class CheckpointReader:
    """Lazy, name-addressed access to every tensor of a checkpoint; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles = []
        self._where: dict[str, tuple[object, Path]] = {}  # tensor name -> (open file, its path)
        self._headers: dict[Path, dict] = {}  # file -> its parsed header (read by ``locate``)
        for file in weight_files(self.path):
            handle = _open(file)
            self._handles.append(handle)
            for name in handle.keys():
                if name in self._where:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {self._where[name][1].name}")
                self._where[name] = (handle, file)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()
        self._headers.clear()

    def names(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        handle, _ = self._locate(name)
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read tensor ``name`` (CPU, stored dtype); check its shape when ``expected_shape`` is given."""
        handle, file = self._locate(name)
        if expected_shape is not None:
            got = tuple(handle.get_slice(name).get_shape())
            if got != tuple(expected_shape):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(got)}, "
                                      f"expected {list(expected_shape)}")
        try:
            return handle.get_tensor(name)
        except Exception as e:  # truncated data section, unknown dtype
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def locate(self, name: str) -> TensorLocation:
        """The byte range of tensor ``name`` in its file, for readers that fetch it later
        themselves (positional reads). Raises ``CheckpointError`` for a dtype torch has no
        name for here or a range outside the file."""
        _, file = self._locate(name)
        if file not in self._headers:
            header = read_header(file)
            self._headers[file] = {"start": 8 + len(header), "size": file.stat().st_size,
                                   "tensors": json.loads(header)}
        h = self._headers[file]
        info = h["tensors"][name]
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES or not 0 <= begin <= end or h["start"] + end > h["size"]:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']} or range {begin}..{end} "
                                  f"that cannot be read positionally")
        return TensorLocation(file, h["start"] + begin, end - begin, _DTYPES[info["dtype"]], tuple(info["shape"]))

    def _locate(self, name: str) -> tuple[object, Path]:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        return self._where[name]


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointError(f"{file}: corrupt safetensors file ({e})") from None


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of the checkpoint, file by file, names sorted."""
    for file in weight_files(path):
        handle = _open(file)
        for name in sorted(handle.keys()):
            try:
                yield name, handle.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def read_header(file: Path) -> bytes:
    """The raw JSON header bytes of one safetensors file (after its 8-byte length prefix)."""
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file}: corrupt safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{file}: corrupt safetensors file (header length {n} bytes)")
        header = f.read(n)
    if len(header) != n:
        raise CheckpointError(f"{file}: corrupt safetensors file (header truncated: {len(header)} of {n} bytes)")
    try:
        json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors file (header is not JSON: {e})") from None
    return header


def checkpoint_fingerprint(path: str | Path, sample_bytes: int = 1 << 16) -> str:
    """sha256 hex of config.json, every safetensors header, and a sample of every file's
    tensor data (its first and last ``sample_bytes``), files in sorted order. A ``.gguf``
    file: ``gguf_file.gguf_fingerprint`` (its header and a sample of its data).

    Stable for the same folder; differs whenever the config, a tensor's name, dtype or shape,
    a file's ``__metadata__`` differs, and (through the data sample) for fine-tunes that
    share config and shapes, at the cost of reading 128 KiB per file.
    """
    if str(path).lower().endswith(".gguf"):
        from services.engine.gguf_file import gguf_fingerprint  # gguf_file imports this module

        return gguf_fingerprint(path, sample_bytes)
    path = Path(path)
    files = sorted(weight_files(path), key=lambda f: f.name)
    parts = [(path / "config.json").read_bytes()]
    for f in files:
        header = read_header(f)
        parts += [header, _data_sample(f, len(header) + 8, sample_bytes)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))  # length-prefixed: no ambiguity between parts
        digest.update(part)
    return digest.hexdigest()


def _data_sample(file: Path, data_start: int, n: int) -> bytes:
    """The first and last ``n`` bytes of a safetensors file's data section."""
    with open(file, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(data_start)
        head = fh.read(n)
        fh.seek(max(data_start, size - n))
        return head + fh.read(n)
