"""One derivation for the seed of every random stream: a stream is named by a path under the run's seed, and its seed
is a hash of (seed, *path), so that nearby seeds, steps, ranks or indices give unrelated streams.

The streams, by path (names are turned into integers by :func:`stream_key`):

* ``(index, stream)`` -- sample ``index``'s noise (stream 0; the likelihood's Hutchinson probes too) and label
  (stream 1) draws, the balanced labels' permutation (``(0, 2)``) and the likelihood's dequantisation noise (stream
  3, ``likelihood.DATA_STREAM``): :func:`diffusion.sampling.per_sample.index_seed`.
* ``("global draws", step)`` -- the times, noise and dropout draws of the whole global batch of training step
  ``step`` (``train.global_noise``).
* ``("torch", rank, step)`` -- torch's global RNG of process ``rank`` during training step ``step``.
* ``("epoch", epoch)`` -- the order of the training set in epoch ``epoch`` of the training stream.
* ``("item", position)`` -- the augmentation of the item at global position ``position`` of the training stream.
* ``("caption", i)`` -- which of image ``i``'s captions conditions in-training FID sample ``i`` (text models).
* ``("repa projectors",)`` -- the initial weights of REPA's projectors; ``("repa legacy", step)`` -- REPA's legacy
  second label drop of training step ``step``.
"""

from __future__ import annotations

import numpy as np


def stream_key(part: int | str) -> int:
    """A path element as the non-negative integer SeedSequence takes: names as their UTF-8 bytes read as one
    (little-endian) integer, far above any index or step, so a named stream never meets an indexed one."""
    if isinstance(part, str):
        return int.from_bytes(part.encode(), "little")
    if part < 0:
        raise ValueError(f"a random stream's path holds non-negative integers and names, got {part}")
    return int(part)


def derive_seed(seed: int, *path: int | str) -> int:
    """The 63-bit seed of the random stream ``path`` of a run seeded with ``seed`` (numpy's SeedSequence over
    ``[seed mod 2**64, *path]``): fits every torch generator, CPU or CUDA."""
    entropy = [seed % 2**64, *(stream_key(part) for part in path)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1
