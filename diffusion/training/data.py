"""The training data as the loop sees it: the dataset, its codecs, the stream of batches, the conditioning of a
batch, a step's draws."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import ml_collections
import torch

from diffusion.data.cached import CACHED_FEATURE_DATASETS
from diffusion.data.datasets import build_dataset
from diffusion.data.stream import InfiniteSampler, StreamItems
from diffusion.errors import ConfigError, UnreadableDataError
from diffusion.objectives.guidance import drop_labels
from diffusion.pretrained.autoencoder import Autoencoder
from diffusion.registry import describe
from diffusion.seeds import derive_seed
from diffusion.training.pieces import drop_contexts
from diffusion.training.stopping import ignore_stop_signals

log = logging.getLogger("diffusion.train")


@dataclass
class TrainData:
    """What the loop needs from the data side."""

    dataset: torch.utils.data.Dataset
    example: dict  # the first readable item: what the model's conditioning is checked against
    shape: tuple[int, ...]  # (C, H, W) the backbone sees: latents for latent models
    encode: Callable | None  # images -> scaled latents, when the config encodes on the fly (the original DiT's way)
    decode: Callable | None  # scaled latents -> images, for previews
    null_context: torch.Tensor | None  # the empty caption's tokens (text-to-image), the target of caption dropout
    class_names: list[str] | None
    class_counts: list[int] | None  # per-class training counts (sample.py's train_freq labels)

    def caption_contexts(self, count: int, seed: int) -> torch.Tensor:
        """(count, tokens, dim) caption contexts of the first training images, each image's caption choice fixed
        by ``seed``: what text-to-image previews and FID samples are conditioned on."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return torch.stack([self.dataset[i]["context"] for i in range(min(count, len(self.dataset)))])


class CaptionContexts:
    """The caption contexts of a text-to-image dataset read on demand: ``contexts[indices]`` (a LongTensor of
    positions) -> (len(indices), tokens, dim), position i the context of image i with its caption chosen by (seed, i)
    alone, so any process reads the same one. What in-training FID conditions sample i on (cycled by SampleSource)."""

    def __init__(self, dataset, seed: int, count: int | None = None):
        self.dataset, self.seed = dataset, seed
        self.count = len(dataset) if count is None else min(count, len(dataset))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        items = []
        for i in torch.as_tensor(indices).reshape(-1).tolist():
            with torch.random.fork_rng():
                torch.manual_seed(derive_seed(self.seed, "caption", i))
                items.append(self.dataset[i]["context"])
        return torch.stack(items)


def fid_captions(config, data: TrainData) -> CaptionContexts | None:
    """The captions of in-training FID for a text-to-image run: ``eval.captions`` (another cached MS-COCO split,
    e.g. val2014 as U-ViT, checked like the training cache), else the first 1,000 training images' (cycled)."""
    if data.null_context is None:
        return None
    root = config.eval.get("captions", "")
    if not root:
        return CaptionContexts(data.dataset, config.eval.seed, count=1000)
    if config.data.name != "coco_latents":
        raise ConfigError(f"eval.captions={root!r} names cached MS-COCO features; data.name={config.data.name!r} "
                          f"has no such captions: leave eval.captions empty")
    split = build_dataset(ml_collections.ConfigDict({**config.data.to_dict(), "root": root}), train=False,
                          autoencoder_cfg=config.autoencoder, text_encoder_cfg=config.text_encoder)
    return CaptionContexts(split, config.eval.seed)


def class_counts(dataset) -> list[int] | None:
    counts = getattr(dataset, "class_counts", None)
    targets = getattr(getattr(dataset, "base", None), "targets", None)
    if counts is None and targets is not None:
        counts = torch.bincount(torch.as_tensor(targets), minlength=len(dataset.classes)).tolist()
    return [int(c) for c in counts] if counts is not None else None


def prepare_data(config, device) -> TrainData:
    """The training set of ``config.data`` with the autoencoder around it (latent models), as :class:`TrainData`."""
    autoencoder = None
    if config.autoencoder.pretrained:
        autoencoder = Autoencoder.from_config(config.autoencoder, device=device)
    elif config.data.name in CACHED_FEATURE_DATASETS:  # scaled latents already
        raise ConfigError(f"data.name={config.data.name!r} holds SD-VAE latents: set autoencoder.pretrained to the "
                          f"autoencoder they were extracted with (checked against the manifest; decodes previews)")
    dataset = build_dataset(config.data, train=True, autoencoder_cfg=config.autoencoder,
                            text_encoder_cfg=config.text_encoder, autoencoder=autoencoder)
    on_the_fly = autoencoder is not None and config.data.name not in CACHED_FEATURE_DATASETS
    example, _ = StreamItems(dataset, config.seed).read(0)
    shape = autoencoder.latent_shape(config.data.image_size) if on_the_fly else tuple(example["x"].shape)
    null_context = getattr(dataset, "null_context", None)
    return TrainData(dataset=dataset, example=example, shape=tuple(shape),
                     encode=autoencoder.encode if on_the_fly else None,
                     decode=autoencoder.decode if autoencoder is not None else None,
                     null_context=None if null_context is None else null_context.to(device),
                     class_names=[str(c) for c in getattr(dataset, "classes", [])] or None,
                     class_counts=class_counts(dataset))


def check_conditioning(net, data: TrainData, p_uncond: float) -> None:
    """The model's conditioning must be one the data can feed, and guidance training needs a null input."""
    sample, info = data.example, describe(net)
    if info.conditioning == "text":
        if "context" not in sample:
            raise ConfigError(f"the model is text-conditioned but dataset {type(data.dataset).__name__} "
                              f"yields no caption contexts; use data.name=coco_latents")
        if p_uncond > 0 and data.null_context is None:
            raise ConfigError("cond.p_uncond > 0 needs the dataset's null_context (the empty caption's encoding)")
        return
    if info.conditioning == "class" and "y" not in sample:
        raise ConfigError(f"the model is class-conditional but dataset {type(data.dataset).__name__} has no labels")
    if info.conditioning == "class" and p_uncond > 0 and info.null_label is None:
        raise ConfigError("cond.p_uncond > 0 needs a model with a null label (U-ViT: num_classes = classes + 1 "
                          "and null_label = classes; DiT: class_dropout_prob > 0)")


def batch_conditioning(net, batch: dict, data: TrainData, p_uncond: float, device,
                       uniform: torch.Tensor | None = None) -> dict:
    """The network's conditioning inputs for one batch, with classifier-free guidance dropout applied (decided by
    ``uniform``, one draw per row, when given)."""
    info = describe(net)
    if info.conditioning == "text":
        context = batch["context"].to(device, non_blocking=True)
        return {"context": drop_contexts(context, p_uncond, data.null_context, uniform)}
    if info.conditioning == "class":
        return {"y": drop_labels(batch["y"].to(device, non_blocking=True), p_uncond, info.null_label, uniform)}
    return {}


def preview_contexts(data: TrainData, config) -> dict:
    """Text-to-image previews: the captions of the first training images (a fixed choice), one row each."""
    if data.null_context is None:
        return {}
    contexts = data.caption_contexts(4, config.sample.seed)
    return {"contexts": contexts.to(data.null_context.device), "null_context": data.null_context}


def stream_batches(dataset, seed: int, batch_size: int, num_workers: int, device: torch.device, rank: int = 0,
                   world: int = 1, samples_seen: int = 0):
    """Batches of rank ``rank``'s share of the training stream from global position ``samples_seen`` on, endlessly
    (also what scripts/benchmark.py reads, so it times the trainer's data path)."""
    sampler = InfiniteSampler(len(dataset), rank=rank, world_size=world, seed=seed, start_index=samples_seen,
                              with_positions=True)
    loader = torch.utils.data.DataLoader(StreamItems(dataset, seed), batch_size=batch_size, sampler=sampler,
                                         num_workers=num_workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)
    return iter(loader)


def count_skipped(skipped: list[str], on_corrupt: str, rank: int, world: int) -> int:
    """Apply data.on_corrupt to the unreadable images a micro-batch replaced: stop naming the file, or warn."""
    errors = [error for item in skipped if item for error in item.split("\n")]
    if errors and on_corrupt == "error":
        raise UnreadableDataError(f"{errors[0]}. Replace or delete the file, or set --config.data.on_corrupt=skip to "
                                  f"skip unreadable images (each is replaced by the next readable one and counted)")
    for error in errors:
        where = f" (process {rank})" if world > 1 else ""
        print(f"[train] warning{where}: skipped an unreadable image, the next readable one took its place: {error}",
              file=sys.stderr)
        log.warning("skipped an unreadable image: %s", error)
    return len(errors)


@dataclass
class StepDraws:
    """Times, noise and dropout draws of one step for the whole global batch, rows in stream order."""

    t: torch.Tensor
    noise: torch.Tensor
    uniform: torch.Tensor

    def rows(self, micro: int, micro_batch: int, rank: int, world: int) -> tuple[dict, torch.Tensor]:
        """({"t", "noise"}, uniform) of this process's micro-batch ``micro`` (``micro_batch_rows``)."""
        rows = micro_batch_rows(micro, micro_batch, rank, world)
        return {"t": self.t[rows], "noise": self.noise[rows]}, self.uniform[rows]


def micro_batch_rows(micro: int, micro_batch: int, rank: int, world: int) -> slice:
    """The global-batch rows of this process's micro-batch ``micro``: the sampler deals rank r the global positions
    r, r + world, ..., so micro-batch m holds the step's rows m * mb * world + r + j * world."""
    return slice(micro * micro_batch * world + rank, (micro + 1) * micro_batch * world, world)


def step_draws(objective, batch_size: int, shape: tuple[int, ...], seed: int, step: int, device) -> StepDraws:
    """The draws of step ``step`` for all ``batch_size`` rows of the global batch at once, from one generator on the
    device: the same numbers for any process count, micro-batch size or accumulation."""
    generator = torch.Generator(device).manual_seed(derive_seed(seed, "global draws", step))
    t = objective.sample_time(batch_size, device, generator)
    uniform = torch.rand(batch_size, device=device, generator=generator)
    noise = torch.randn((batch_size, *shape), device=device, generator=generator)
    return StepDraws(t=t, noise=noise, uniform=uniform)
