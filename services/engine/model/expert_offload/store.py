"""The slower tier of one MoE layer: where every expert is, and copying one into a slot.

- ``FileStore``: the checkpoint's safetensors file. Keeps only each tensor's byte range;
  a load is one ``os.preadv`` per tensor straight into the slot's memory (when the stored
  dtype is the model's and the slot is on the CPU; else into a buffer, then converted). No
  mapping is kept, so the file's pages sit in the page cache, not in this process's RSS.
- ``HostStore``: every expert in CPU memory (pinned when the slots are on a GPU), as the
  loader read them, converted to the model's dtype once.

A slot is ``gate_up`` [2I, D] (gate rows, then up rows) and ``down`` [D, I], the layout of
``LocalExperts``'s stacked weights, so the same GEMMs run on it.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from services.engine.checkpoint import TensorLocation
from services.engine.model.experts import ExpertSource


class ExpertStore(ABC):
    @abstractmethod
    def put(self, expert: int, source: ExpertSource) -> None:
        """Take ``expert`` from the checkpoint (called once per expert while loading)."""

    @abstractmethod
    def read_into(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy ``expert``'s weights into a slot: gate_up [2I, D], down [D, I]."""


class OpenFiles:
    """Read-only descriptors of the checkpoint files, opened on first use and shared by every
    layer's store (``os.preadv`` takes no file position, so threads may share one)."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_tensor_into(fd: int, loc: TensorLocation, dst: torch.Tensor) -> None:
    """Fill ``dst`` (shape ``loc.shape``) from the file; a dtype or device mismatch goes
    through a CPU buffer and one ``copy_``."""
    direct = dst.device.type == "cpu" and dst.dtype == loc.dtype and dst.is_contiguous()
    buf = dst if direct else torch.empty(loc.shape, dtype=loc.dtype)
    view = buf.view(-1).view(torch.uint8).numpy()  # the tensor's own bytes, writable
    done = 0
    while done < loc.nbytes:
        n = os.preadv(fd, [view[done:]], loc.offset + done)
        if n <= 0:
            raise OSError(f"{loc.file}: short read at byte {loc.offset + done} (file truncated?)")
        done += n
    if not direct:
        dst.copy_(buf)


class FileStore(ExpertStore):
    def __init__(self, files: OpenFiles, intermediate_size: int):
        self.files = files
        self.i = intermediate_size
        self._where: dict[int, tuple[TensorLocation, ...]] = {}  # expert -> (gate, up, down)

    def put(self, expert: int, source: ExpertSource) -> None:
        if source.locations is None:
            raise ValueError("experts.tier: 'file' reads experts from safetensors files; this checkpoint "
                             "is not one (use tier 'host' or 'auto')")
        self._where[expert] = source.locations

    def read_into(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        gate, up, dn = self._where[expert]
        read_tensor_into(self.files.fd(gate.file), gate, gate_up[:self.i])
        read_tensor_into(self.files.fd(up.file), up, gate_up[self.i:])
        read_tensor_into(self.files.fd(dn.file), dn, down)


class HostStore(ExpertStore):
    def __init__(self, dtype: torch.dtype, pin: bool):
        self.dtype = dtype
        self.pin = pin
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # expert -> (gate_up, down)

    def put(self, expert: int, source: ExpertSource) -> None:
        gate, up, down = source.read()
        gate_up = torch.cat([gate, up]).to(self.dtype)
        down = down.to(self.dtype).contiguous()
        if self.pin:
            gate_up, down = gate_up.pin_memory(), down.pin_memory()
        self._experts[expert] = (gate_up, down)

    def read_into(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        src_gate_up, src_down = self._experts[expert]
        gate_up.copy_(src_gate_up)
        down.copy_(src_down)
