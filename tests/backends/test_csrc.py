"""Source-level rules every csrc kernel must keep; checked on CPU, where CI compiles but never
runs them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"

KERNELS = [
    (path.name, m.start())
    for path in sorted(CSRC.glob("*.cu"))
    for m in re.finditer(r'extern "C"', path.read_text())
]
# Kernels that load weights before pdl_start() (weights are never written, so they may stream in
# while the kernel before finishes); weight_stream.cuh's stream_k calls it after the first group.
WEIGHTS_FIRST = {"gemv_nt", "gemv_rope_kv_nt"}
# Kernels that let the next kernel launch and issue L2 prefetches of weights (hints: nothing is
# read into a register, no memory written) before pdl_wait(), which keeps the chain's order.
PREFETCH_FIRST = {"l2_prefetch", "l2_prefetch_experts"}


def test_the_sources_hold_kernels():
    assert len(KERNELS) >= 20


@pytest.mark.parametrize("name,offset", KERNELS)
def test_every_kernel_first_waits_for_the_kernel_before_it(name, offset):
    """Decode graphs launch csrc kernels with programmatic dependent launch (cuda_launch.py):
    a kernel touching memory before `pdl_start()` would race the kernel before it."""
    text = (CSRC / name).read_text()
    body = text[text.index("{", offset) + 1 :]
    first = body.lstrip(" \\\n").split(";", 1)[0]
    signature = text[offset : text.index("(", text.index("(", offset) + 1)]
    # `void name(`, or `void __launch_bounds__(...) \ name##NT(` in the macros
    kernel = re.match(r'extern "C" __global__ void[\s\\]+(?:__\w+__\([^)]*\)[\s\\]+)?'
                      r"(\w+?)(?:##\w+)?\(", text[offset:]).group(1)  # fmt: skip
    if kernel in WEIGHTS_FIRST:
        assert "U, true>(" in text  # stream_k is told to wait
        return
    if kernel in PREFETCH_FIRST:
        own = body[: body.index("\n}")]
        before = [st.strip() for st in own[: own.index("pdl_wait();")].split(";")]
        assert all(st.startswith(("pdl_launch_dependents()", "prefetch_l2(")) for st in before[:-1])
        return
    assert first == "pdl_start()", f"{name}: {signature} starts with {first!r}"
