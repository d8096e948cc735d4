"""Speed options shared by the trainer and ``scripts/benchmark.py``: each changes how fast a step runs, never what
it computes (fp32 results are equal to rounding; tests/test_speed.py holds every option to that).

* ``train.attention``: the attention path of the backbones (``auto`` | ``sdpa`` | ``math``, see ``attend`` in
  uvit/model.py and dit/model.py); ``auto`` takes the explicit product for bf16/fp16 on CPU, SDPA elsewhere.
* ``optim.impl``: torch's AdamW implementation (``for_loop`` | ``foreach`` | ``fused``); ``auto`` is fused.
* ``train.cpu_reuse_memory``: keep freed tensor memory in the process heap on CPU instead of returning every
  block over 32 MB to the kernel (glibc's default), which makes each large activation page-fault afresh.
* :func:`cpu_has_native_bf16`: whether bf16 runs natively on this CPU; elsewhere torch emulates it, far slower
  than fp32, and the trainer and the benchmark say so.
* ``train.compile`` (inductor), ``train.tf32``, ``train.mixed_precision`` and ``model.use_checkpoint``
  (gradient checkpointing) live with the trainer and the backbones.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

import torch

from diffusion.errors import ConfigError

OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap


def adamw(param_groups, lr: float, betas, eps: float, impl: str = "auto") -> torch.optim.AdamW:
    """torch's AdamW in the chosen implementation. They compute the same update; ``fused`` does it in one kernel
    per dtype (CPU and CUDA), ``foreach`` in a few multi-tensor ops, ``for_loop`` parameter by parameter (torch's
    default on CPU)."""
    if impl not in OPTIMIZER_IMPLS:
        raise ConfigError(f"unknown optim.impl {impl!r}; known: {', '.join(OPTIMIZER_IMPLS)}")
    flags = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
             "for_loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), eps=eps, **flags)


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from the heap and keep freed memory there (no mmap per large
    block, no trimming below 1 GiB). A CPU training step allocates the same large activations every step; by default
    each one over 32 MB is a fresh mmap whose pages fault in on first touch, which can cost more than the op that
    fills it. Process-wide and harmless elsewhere; False where the C library is not glibc (nothing changed)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 matmul instructions


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware: on x86 the ``avx512_bf16`` or ``amx_bf16`` flag, on ARM the
    ``bf16`` feature (both read from ``cpuinfo``). Without them torch emulates bf16 matmuls in software. True where
    it cannot tell (another platform, no readable ``cpuinfo``): nothing is claimed then."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return True
    words = {word for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for word in line.partition(":")[2].split()}
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return any(flag in words for flag in X86_BF16_FLAGS)
    if machine in ("aarch64", "arm64"):
        return "bf16" in words
    return True
