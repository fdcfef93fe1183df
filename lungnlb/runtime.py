"""Process settings that make CPU inference faster; call before `import torch`.

torch's CPU allocator hands every large tensor fresh pages from the kernel, so each 32 MiB
activation of a 512 x 512 U-Net costs ~8,000 page faults (4 KiB pages) on every forward pass.
With `THP_MEM_ALLOC_ENABLE=1` torch aligns allocations of 2 MiB and more to 2 MiB and asks for
transparent huge pages (madvise), which is 512x fewer faults and a markedly faster CPU forward
pass (`THP_MEM_ALLOC_ENABLE=0 .venv/bin/python -m benchmarks.speed` measures without it). The
variable is read once, at torch's first allocation, so it must be set before torch is imported;
an explicit setting in the environment (e.g. `THP_MEM_ALLOC_ENABLE=0`) is left alone.
"""

from __future__ import annotations

import os
import sys

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def enable_huge_pages() -> bool:
    """Set THP_MEM_ALLOC_ENABLE=1 unless already set; False if torch was imported too early for it to apply."""
    os.environ.setdefault(HUGE_PAGES, "1")
    return "torch" not in sys.modules
