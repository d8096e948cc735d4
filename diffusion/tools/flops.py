"""The two numbers behind MFU: the FLOPs of one forward of a backbone (the one FLOP counter of the project, for
U-ViT and DiT alike) and the matmul peak of this machine, measured within a time budget."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion.registry import build_model, describe, set_attention
from diffusion.sampling.loader import input_shape


def synthetic_conditioning(net, batch: int, device, generator: torch.Generator) -> dict:
    """Random conditioning of the kind ``net`` takes: caption contexts, class labels, or none."""
    info = describe(net)
    if info.conditioning == "text":
        return {"context": torch.randn(batch, *info.context_shape, generator=generator).to(device)}
    classes = info.num_labels
    return {"y": torch.randint(0, classes, (batch,), generator=generator).to(device)} if classes > 0 else {}


def forward_flops(config, cond: dict | None = None) -> int:
    """FLOPs (2 per multiply-add) of one forward of the config's backbone for one sample, at its own input shape.

    Counted with torch's FlopCounterMode on the meta device (nothing is allocated) with the explicit attention path,
    so q k^T and the attention-weighted sum are counted as matmuls (the counter does not see SDPA's CPU kernels).
    Elementwise ops (norms, activations, softmax) are not counted, as in the DiT paper, whose "Gflops" are these
    FLOPs / 2 (multiply-accumulates). ``cond``: conditioning inputs whose shapes to use (batch dimension first);
    default: a class label or a caption context, as the backbone takes."""
    shape = input_shape(config)
    with torch.device("meta"):
        net = set_attention(build_model(config.model), "math").eval()
    if cond is None:
        cond = synthetic_conditioning(net, 1, "cpu", torch.Generator().manual_seed(0))
    with torch.device("meta"):
        x, t = torch.zeros(1, *shape), torch.zeros(1)
        meta_cond = {k: torch.zeros((1, *v.shape[1:]), dtype=v.dtype) for k, v in cond.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t, **meta_cond)
    return int(counter.get_total_flops())


def _best_rate(size: int, dtype: torch.dtype, device: str, seconds: float) -> tuple[float, float]:
    """(best FLOP/s, seconds of one matmul) of ``size``-square matmuls, timed for about ``seconds`` after one
    untimed call. The product is ``a @ b.T`` with both contiguous, the layout of every linear layer: where bf16 is
    emulated, torch's fallback kernels are much faster in this layout than for ``a @ b``, and a peak taken in the
    other one would sit below what the networks reach."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype).t()
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b, out=out)
    sync()
    best, spent, one = 0.0, 0.0, float("inf")
    while spent < seconds or best == 0.0:
        count, start = 0, time.perf_counter()
        while True:  # a batch of calls long enough to time (GPU launches are asynchronous)
            torch.mm(a, b, out=out)
            count += 1
            if count & (count - 1) == 0:  # check the clock (and wait for the device) at powers of two only
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min(0.05, seconds):
                    break
        best, spent, one = max(best, count * 2 * size**3 / elapsed), spent + elapsed, min(one, elapsed / count)
    return best, one


def matmul_peak(dtype: torch.dtype, device: str, budget_s: float = 2.0, max_size: int = 0) -> float:
    """The best FLOP/s of square matmuls in ``dtype`` on this machine, measured in about ``budget_s`` seconds
    whatever its speed: the size starts small and doubles (up to ``max_size``; CPU 2048, GPU 8192) while the next
    size still fits the budget, and the rest of the budget repeats the largest size."""
    max_size = max_size or (8192 if device.startswith("cuda") else 2048)
    deadline = time.perf_counter() + budget_s
    size, best = 128, 0.0
    while True:
        rate, one = _best_rate(size, dtype, device, seconds=0.0)
        best = max(best, rate)
        remaining = deadline - time.perf_counter()
        if size >= max_size or 8 * one * 4 > remaining:  # the next size: 8x the work, a few calls
            break
        size *= 2
    if remaining > 0:
        best = max(best, _best_rate(size, dtype, device, seconds=remaining)[0])
    return best
