"""runtime.keep_freed_memory: glibc's malloc serves tensors from its heap, not fresh mappings."""

import json
import subprocess
import sys

import pytest

from tadfkd.run import runtime
from tadfkd.run.runtime import glibc_version

# A child process, so that the allocator of this one is left as it is: the blocks glibc has
# mapped on their own (mallinfo2's hblks) before and after a 4 MiB tensor is made.
CHILD = """
import ctypes, json, sys
import torch
from tadfkd.run.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
applied = keep_freed_memory(sys.argv[1] == "keep")
before = mallinfo2().hblks
tensor = torch.ones(1024, 1024)
print(json.dumps({"applied": applied, "mapped": mallinfo2().hblks - before}))
"""


def mapped_blocks(mode: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.skipif(glibc_version() is None, reason="glibc's malloc only")
def test_a_tensor_comes_from_the_heap_once_freed_memory_is_kept():
    assert mapped_blocks("default") == {"applied": False, "mapped": 1}  # glibc's own policy
    assert mapped_blocks("keep") == {"applied": True, "mapped": 0}


def test_elsewhere_than_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(runtime, "glibc_version", lambda: None)
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda *_: pytest.fail("mallopt was called"))
    assert runtime.keep_freed_memory() is False
