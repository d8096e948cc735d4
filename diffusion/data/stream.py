"""The training stream: an endless, resumable, rank-sharded order of dataset positions, and items whose
augmentation depends only on their position in it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from diffusion.errors import DatasetNotFoundError
from diffusion.seeds import derive_seed


class InfiniteSampler(Sampler[int]):
    """Endless, deterministic, resumable index stream, sharded over ranks.

    The global stream concatenates epochs; epoch e is ``torch.randperm(n)`` drawn from a generator seeded with
    ``derive_seed(seed, "epoch", e)`` (``arange(n)`` without shuffling). Rank r takes global positions r,
    r + world_size, ... that are >= ``start_index``, the number of global positions already consumed (the samples
    a resumed run has trained on). Only the current epoch's permutation is held, and resuming jumps straight to the
    right epoch. With ``with_positions`` it yields ``(global position, index)`` pairs, the keys of
    :class:`StreamItems`.
    """

    def __init__(
        self,
        dataset_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_index: int = 0,
        with_positions: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_index = start_index
        self.with_positions = with_positions

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.dataset_len, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        position = self.start_index + (self.rank - self.start_index) % self.world_size
        epoch, order = -1, []
        while True:
            e, offset = divmod(position, self.dataset_len)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield (position, order[offset]) if self.with_positions else order[offset]
            position += self.world_size


class StreamItems(Dataset):
    """The training stream's items: ``items[(position, index)]`` is ``dataset[index]`` read with torch's CPU RNG
    seeded from (``seed``, position), so random flips, posterior samples and caption choices depend only on where the
    item sits in the stream -- not on the process or DataLoader worker reading it, nor on whether the run resumed.

    An unreadable item (OSError: a truncated or non-image file) is replaced by the next readable index, and the
    errors are returned under ``"skipped"`` (one string per item, "" when nothing was skipped, errors joined by
    newlines) for the trainer to count and to apply ``data.on_corrupt``: a corrupt file never ends an epoch early.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def read(self, index: int) -> tuple[dict[str, Any], list[str]]:
        """(the first readable item at ``index`` or after it, cyclically; the errors of the unreadable ones)."""
        errors: list[str] = []
        for k in range(len(self)):
            try:
                return self.dataset[(index + k) % len(self)], errors
            except OSError as err:
                errors.append(str(err))
        raise DatasetNotFoundError(f"no item of {type(self.dataset).__name__} is readable; first error: {errors[0]}")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = key
        in_worker = torch.utils.data.get_worker_info() is not None  # a worker's RNG is its own to reseed
        with torch.random.fork_rng(devices=[], enabled=not in_worker):
            torch.default_generator.manual_seed(derive_seed(self.seed, "item", position))
            item, errors = self.read(index)
        return {**item, "skipped": "\n".join(errors)}
