"""REPA in the trainer (representation alignment, diffusion/objectives/repa.py): the refusals, the run's REPA objects
(frozen encoders, projectors, the tap), the encoder targets of a batch and one micro-batch's loss.

Set up by ``repa.encoders`` (transport objective only). The encoders are frozen and in eval mode and held in a plain
list, never as submodules of anything trained, so they enter no checkpoint, EMA or DDP wrapper. The projectors are
trained with the backbone: their parameters join the optimizer (after the backbone's), DDP wraps them with the
backbone in one :class:`WithProjectors` container so both get gradient sync, and checkpoints keep them in
``projectors.safetensors`` (the EMA averages the backbone only; sampling never reads the projectors).

Encoder targets come from the batch's clean images before any autoencoder: the model-input images in [-1, 1] back to
uint8 as the datasets made them (``round((x + 1) * 127.5)``; the digits' 0..16 levels become 0..255 greys), a grey
channel repeated to three. Encoders are set up for ``data.image_size`` px when that is a multiple of 16 (REPA's
rule: ``resolution / 16`` tokens per side); otherwise (the 8x8 digits) for 16 px per backbone patch, so the encoder's
grid is the backbone's and its own bicubic preprocessing upsamples the small images to its input.

From cached latents (``data.name=latents`` / ``coco_latents``) the targets are the encoder features the extraction
stored beside the latents (``scripts/extract_latents.py --repa_encoders``; each item's ``repa_features``, of the same
view as its latent), the same numbers as the encoders on the images. The manifest's encoders must be
``repa.encoders`` (names, in order), set up for the same px, with the same weights (the sha256 of the loaded
encoder, :func:`diffusion.data.cached.vision_encoder_digest`); a cache without features is refused with the command
that makes them. The encoders are then loaded on the CPU only to check their weights and size the projectors.

Determinism: ``repa.legacy``'s second label drop reads one uniform per row of the global batch from a generator seeded
by (seed, "repa legacy", step), so a resumed run draws the same ones.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from diffusion.data.cached import CACHED_FEATURE_DATASETS, REPA_SETTINGS, read_manifest, vision_encoder_digest
from diffusion.errors import ConfigError, DatasetNotFoundError
from diffusion.objectives.repa import Projectors, register_tap, repa_training_losses
from diffusion.pretrained.vision_encoders import load_vision_encoders, parse_name, split_names
from diffusion.registry import describe, tap_blocks
from diffusion.sampling.pixels import to_uint8
from diffusion.seeds import derive_seed

log = logging.getLogger("diffusion.train")


def repa_enabled(config) -> bool:
    return "repa" in config and bool(split_names(config.repa.encoders))


def check_repa(config) -> None:
    """Refuse REPA settings the trainer cannot run (before anything heavy is built)."""
    if not repa_enabled(config):
        return
    if config.diffusion.kind != "transport":
        raise ConfigError(f"repa.encoders={config.repa.encoders!r} needs diffusion.kind=transport (REPA regularises "
                          f"SiT's flow matching), got diffusion.kind={config.diffusion.kind!r}: set "
                          f"--config.diffusion.kind=transport or --config.repa.encoders=")
    if config.data.name in CACHED_FEATURE_DATASETS:
        cached_repa_entries(config)
    if config.train.fsdp:
        raise ConfigError(f"REPA with train.fsdp={config.train.fsdp!r} is not supported yet: train with DDP "
                          f"(--config.train.fsdp=)")


def _extract_command(config) -> str:
    weights = f" --repa_encoder_weights {config.repa.encoder_weights}" if config.repa.encoder_weights else ""
    script = "extract_coco.py" if config.data.name == "coco_latents" else "extract_latents.py"
    return f"scripts/{script} ... --out NEW_FOLDER --repa_encoders {config.repa.encoders}{weights}"


def cached_repa_entries(config) -> list[dict]:
    """The manifest entries of the REPA features of the cache ``data.root``, checked against ``repa.encoders`` by
    name; ConfigError when there are none, or others."""
    images = (f"REPA needs the images or their cached encoder features (data.name={config.data.name!r}, "
              f"data.root={config.data.root!r})")
    try:
        manifest = read_manifest(config.data.root)
    except DatasetNotFoundError as err:
        raise ConfigError(f"{images}: {err}") from None
    entries = manifest.get(REPA_SETTINGS, [])
    if not entries:
        raise ConfigError(f"{images}: the cache was extracted without REPA features. Extract them with the latents "
                          f"into a new folder: {_extract_command(config)}; or train on the image folder "
                          f"(data.name=imagenet, encoded on the fly)")
    wanted = [parse_name(name).name for name in split_names(config.repa.encoders)]
    stored = [entry["name"] for entry in entries]
    if stored != wanted:
        raise ConfigError(f"{config.data.root} holds REPA features of {','.join(stored)}, but repa.encoders="
                          f"{config.repa.encoders!r}: set --config.repa.encoders={','.join(stored)}, or extract "
                          f"those encoders' features into a new folder: {_extract_command(config)}")
    return entries


def check_cached_encoders(config, entries: list[dict], encoders: list, resolution: int) -> None:
    """The loaded ``encoders`` must be the ones that made the cached features: px, size and weights."""
    for entry, encoder in zip(entries, encoders):
        where = f"{config.data.root}'s {entry['name']} features"
        if entry["resolution"] != resolution:
            raise ConfigError(f"{where} were extracted at {entry['resolution']} px, but this run sets its encoders "
                              f"up for {resolution} px (data.image_size={config.data.image_size}); re-extract at "
                              f"--resolution {resolution}")
        if (entry["tokens"], entry["dim"]) != (encoder.num_tokens, encoder.embed_dim):
            raise ConfigError(f"{where} are {entry['tokens']} x {entry['dim']}, the encoder here gives "
                              f"{encoder.num_tokens} x {encoder.embed_dim}: other weights than {entry['weights']!r}")
        digest = vision_encoder_digest(encoder)
        if digest != entry["sha256"]:
            raise ConfigError(f"{where} come from other weights ({entry['weights']!r} there, sha256 "
                              f"{entry['sha256'][:12]}; {encoder.source!r} here, {digest[:12]}): set "
                              f"--config.repa.encoder_weights to the weights they were extracted with, or re-extract "
                              f"with these: {_extract_command(config)}")


def encoder_resolution(image_size: int, grid: int) -> int:
    """The px the encoders are set up for: the images' own when a multiple of 16 (REPA), else 16 per backbone patch
    (``grid`` patches per side)."""
    return image_size if image_size > 0 and image_size % 16 == 0 else 16 * grid


class WithProjectors(nn.Module):
    """The backbone and the projectors in one module for the DDP wrapper (both get gradient sync); its forward is
    the backbone's. Only used to wrap: checkpoints and the EMA take ``net`` and ``projectors`` apart."""

    def __init__(self, net: nn.Module, projectors: Projectors):
        super().__init__()
        self.net, self.projectors = net, projectors

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


class RepaTraining:
    """A run's REPA objects: ``encoders`` (a plain list, frozen), ``projectors`` (the bare module, trained),
    ``tap`` (on the bare backbone), and the settings of the loss."""

    def __init__(self, encoders: list, projectors: Projectors, tap, coeff: float, stop_at_step: int,
                 legacy_p: float, null_label: int | None, cached: bool = False):
        self.encoders, self.projectors, self.tap = encoders, projectors, tap
        self.cached = cached  # targets from the batch's cached ``repa_features``, not from its images
        self.coeff, self.stop_at_step = float(coeff), int(stop_at_step)
        self.legacy_p, self.null_label = legacy_p, null_label

    def coeff_at(self, step: int) -> float:
        """The alignment weight of update ``step``: 0 from ``stop_at_step`` on (when > 0)."""
        return 0.0 if 0 < self.stop_at_step <= step else self.coeff

    @torch.no_grad()
    def targets(self, images: torch.Tensor, features: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every encoder's (B, tokens, dim) features of the clean model-input images (B, C, H, W) in [-1, 1], or,
        from a cache, the batch's stored ``features`` (one (B, tokens, dim) per encoder) on the images' device."""
        if self.cached:
            if features is None or len(features) != len(self.encoders):
                raise ConfigError("REPA from cached latents: the batch carries no repa_features for every encoder")
            return [f.to(images.device, non_blocking=True).float() for f in features]
        pixels = images_to_uint8(images)
        return [encoder(pixels.to(encoder.device)).to(images.device) for encoder in self.encoders]


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (the datasets' ``u / 127.5 - 1``) -> uint8 (B, 3, H, W), grey repeated to three channels."""
    pixels = to_uint8(images, "round", channels_last=False)  # rounding inverts the datasets' scaling exactly
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    if pixels.shape[1] != 3:
        raise ConfigError(f"REPA's encoders need RGB or grey images, the batch has {pixels.shape[1]} channels")
    return pixels


def build_repa(config, net: nn.Module, image_size: int, p_uncond: float, device) -> RepaTraining | None:
    """The encoders (frozen, on ``device``), fresh projectors on ``device`` (seeded by the run's seed) and the tap on
    block ``repa.layer`` of the bare ``net``; None when ``repa.encoders`` is empty."""
    if not repa_enabled(config):
        return None
    rc = config.repa
    info = describe(net)
    hidden, grid = info.hidden_size, info.token_grid
    resolution = encoder_resolution(image_size, grid)
    entries = cached_repa_entries(config) if config.data.name in CACHED_FEATURE_DATASETS else None
    encoders = load_vision_encoders(rc.encoders, weights=rc.encoder_weights, resolution=resolution,
                                    device="cpu" if entries is not None else device)
    if entries is not None:
        check_cached_encoders(config, entries, encoders, resolution)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "repa projectors"))
        projectors = Projectors(int(hidden), [e.embed_dim for e in encoders], rc.projector_dim).to(device)
    try:
        tap = register_tap(tap_blocks(net), rc.layer)
    except ValueError as err:
        raise ConfigError(f"repa.layer: {err}") from None
    legacy_p = p_uncond if rc.legacy else 0.0
    for encoder in encoders:
        if encoder.num_tokens != grid * grid:
            log.info("REPA: the backbone's %d tokens (%dx%d) are resized to %s's %d for the alignment loss",
                     grid * grid, grid, grid, encoder.name, encoder.num_tokens)
    log.info("REPA: %s at %d px (%s tokens), block %d, projector width %d, coeff %g%s%s", rc.encoders, resolution,
             ", ".join(str(e.num_tokens) for e in encoders), rc.layer, rc.projector_dim, rc.coeff,
             f", stops at step {rc.stop_at_step}" if rc.stop_at_step else "",
             ", targets cached in data.root" if entries is not None else "")
    return RepaTraining(encoders, projectors, tap, rc.coeff, rc.stop_at_step, legacy_p,
                        info.null_label, cached=entries is not None)


def legacy_uniform(seed: int, step: int, batch_size: int, rows: slice, device) -> torch.Tensor:
    """This micro-batch's rows of step ``step``'s legacy-drop draws (one per row of the global batch)."""
    generator = torch.Generator("cpu").manual_seed(derive_seed(seed, "repa legacy", step))
    return torch.rand(batch_size, generator=generator)[rows].to(device)


def repa_losses(repa: RepaTraining, objective, model, images: torch.Tensor, x: torch.Tensor, cond: dict,
                given: dict, step: int, uniform: torch.Tensor | None,
                features: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch's REPA loss with the step's draws ``given`` (t, noise) and legacy draws ``uniform``; the
    targets from ``images``, or the batch's cached ``features``. Past ``stop_at_step`` the alignment weight is 0
    (the projectors still see a zero gradient, so DDP syncs them)."""
    has_labels = "y" in cond and repa.null_label is not None
    terms = repa_training_losses(objective, model, x, cond, repa.targets(images, features), repa.projectors, repa.tap,
                                 repa.coeff_at(step), t=given.get("t"), noise=given.get("noise"),
                                 legacy_p=repa.legacy_p if has_labels else 0.0, null_label=repa.null_label,
                                 legacy_uniform=uniform)
    return terms
