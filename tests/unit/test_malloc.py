"""services/engine/malloc.py: huge-page weight buffers (pure memory bookkeeping, no model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from services.engine.malloc import HUGE_PAGE, huge_page_empty

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that contains ``address`` (/proc/self/smaps)."""
    inside, flags = False, []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    return flags


@pytest.mark.parametrize("shape", [(500, 768, 64), (5, 2048, 64)])
def test_huge_page_empty_is_aligned_contiguous_and_writable(shape):
    t = huge_page_empty(shape)
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    src = torch.randn(shape)
    t.copy_(src)
    assert torch.equal(t, src)
    if sys.platform == "linux":
        assert t.data_ptr() % HUGE_PAGE == 0


@pytest.mark.skipif(not THP.exists(), reason="this kernel has no transparent huge pages")
def test_huge_page_empty_advises_huge_pages():
    t = huge_page_empty((4, 1 << 20))  # 16 MiB
    t.fill_(1.0)
    assert "hg" in _vm_flags(t.data_ptr())  # MADV_HUGEPAGE applied to the tensor's pages


def test_small_tensors_are_plain():
    t = huge_page_empty((3, 5), torch.float64)
    assert t.shape == (3, 5) and t.dtype == torch.float64 and t.is_contiguous()
