"""Bits per dimension of a file of images under a transport checkpoint (the library behind ``sample.py --likelihood``).

The images of an ADM-format ``.npz`` (``arr_0`` uint8 (N, H, W, C), ``arr_1`` the labels of a class-conditional
model) are run from data to noise through the unguided probability-flow ODE of the checkpoint's network
(:meth:`diffusion.objectives.transport.Transport.likelihood`, any of ``diffusion.samplers.transport.ODE_METHODS``,
divergence ``hutchinson`` or ``exact``), and :func:`likelihood_report` returns the JSON record. Every function takes
plain values; the command line (its flags, their defaults from the config, the summary it prints) is sample.py's.

* **Pixel models**: image x (uint8) -> ``(x + u) / 256 * 2 - 1`` with uniform dequantisation noise u ~ U[0, 1),
  and bits/dim on the 8-bit grid (``levels=256, data_range=2``: the continuous density's bits/dim plus
  log2(256 / 2) = 7, an upper bound on the negative log-likelihood of the discrete image through the
  dequantisation). This is score-SDE's convention (Song et al. 2021; score_sde_pytorch ``likelihood.py`` adds the
  same offset 7 and evaluates on uniformly dequantised data), not SiT's: SiT's ``sample_ode_likelihood`` returns
  the log-likelihood in nats per sample of its input as given (``prior_logp(z) - delta_logp``, z the ODE's endpoint
  at the noise end), with no dequantisation (its README lists it as a possible improvement), no bits/dim and no
  8-bit offset; its sample.py / sample_ddp.py ``--likelihood`` call it on fresh Gaussian latents and keep only the
  endpoint (``[-1]``), decoded and saved as images: no likelihood is printed or stored. Grey models read
  3-channel files whose channels are equal (what ``sample.py --out=*.npz`` writes for them).
* **Latent models** (``config.autoencoder`` set): images -> a posterior sample of the config's autoencoder
  (``scale_factor * z``, the network's training input), and bits/dim of those continuous latents (no ``levels``):
  not comparable with pixel bits/dim, and the report says so.

Sample i's randomness depends only on (seed, i): its dequantisation noise or posterior draw from stream
``DATA_STREAM`` of ``per_sample.index_seed``, its Hutchinson probes from ``PerSampleNoise`` (stream 0). With the
probes drawn once per sample (the default) or, with ``resample_probes``, afresh at every network evaluation as
SiT does, a fixed-step solver (or the exact divergence) gives a sample the same result in any batch, up to
floating-point rounding; an adaptive solver chooses one step sequence for the whole batch, so there it agrees across
batch sizes only to within its tolerances (and, resampling, the draws themselves follow that sequence).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.errors import ConfigError, InputError, InputNotFoundError
from diffusion.files import write_atomic
from diffusion.sampling.loader import ReadyModel
from diffusion.sampling.per_sample import PerSampleNoise, check_labels, index_seed

DATA_STREAM = 3  # per-sample stream of the dequantisation noise / posterior draw (0: probes, 1 and 2: labels)
DIVERGENCE_DEFAULTS = {"divergence": "hutchinson", "probes": 1, "probe": "rademacher", "resample_probes": False}
PIXEL_SPACE = "pixels: bits/dim on the 8-bit grid, uniformly dequantised"
LATENT_SPACE = ("latents: a posterior sample of the autoencoder, bits/dim of continuous latents (no 8-bit grid; "
                "not comparable with pixel bits/dim)")


def check_model(ready: ReadyModel) -> None:
    """Only the transport objective has a likelihood here, and not for text-to-image models."""
    kind = ready.config.diffusion.kind
    if kind != "transport" or not hasattr(ready.objective, "likelihood"):
        raise ConfigError(f"a likelihood needs a flow-matching checkpoint (diffusion.kind=transport); this one is "
                          f"diffusion.kind={kind} ({type(ready.objective).__name__}), which has no probability-flow "
                          f"likelihood here")
    if ready.conditioning == "text":
        raise ConfigError("likelihood of text-to-image models is not supported")


def divergence_options(divergence: str = "hutchinson", probes: int = 1, probe: str = "rademacher",
                       resample_probes: bool = False) -> dict:
    """The keywords of ``Transport.likelihood`` that choose the divergence: all four for ``hutchinson``, only
    ``divergence`` for ``exact`` (which draws no probes)."""
    if divergence == "exact":
        return {"divergence": "exact"}
    return {"divergence": divergence, "probes": probes, "probe": probe, "resample_probes": bool(resample_probes)}


# ----------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------


def read_data(path: str | Path, n: int | None, labels_needed: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images (N, H, W, C), int64 labels or None) of an ADM-format .npz, its first ``n`` if given."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"likelihood data not found: {path}")
    with np.load(path) as data:
        if "arr_0" not in data:
            raise InputError(f"{path} holds no arr_0 (ADM's format: arr_0 uint8 (N, H, W, C), arr_1 labels)")
        images = data["arr_0"]
        labels = data["arr_1"] if labels_needed and "arr_1" in data else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"{path}: arr_0 must be uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if labels_needed and labels is None:
        raise ConfigError(f"this model is class-conditional: {path} needs the images' labels as arr_1 (ADM's "
                          f"format, what sample.py --out=*.npz writes)")
    n = len(images) if n is None else n
    if not 1 <= n <= len(images) or (labels is not None and len(labels) < n):
        raise ConfigError(f"{n} images asked for: {path} holds {len(images)} images"
                          f"{'' if labels is None else f' and {len(labels)} labels'}")
    return images[:n], None if labels is None else labels[:n].astype(np.int64)


def load_data(ready: ReadyModel, path: str | Path, n: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The file's images and, for a class-conditional model, their labels (checked against its classes)."""
    classes = ready.info.num_labels if ready.conditioning == "class" else 0
    images, labels = read_data(path, n, labels_needed=bool(classes))
    if labels is not None:
        check_labels(sorted(set(labels.tolist())), classes)
    return images, labels


def per_sample_draws(seed: int, indices, shape, uniform: bool) -> torch.Tensor:
    """One float32 draw of ``shape`` per sample from its ``DATA_STREAM``: U[0, 1) or N(0, 1)."""
    draw = torch.rand if uniform else torch.randn
    gens = [torch.Generator().manual_seed(index_seed(seed, int(i), DATA_STREAM)) for i in indices]
    return torch.stack([draw(tuple(shape), generator=g) for g in gens])


def model_pixels(images: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 (B, H, W, C) -> uint8 (B, channels, H, W); equal RGB channels are read as grey for 1-channel data."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.shape[1] == 3 and channels == 1:
        if not (torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])):
            raise InputError("the model takes grey images; these have 3 different channels")
        x = x[:, :1]
    return x


def dequantize(pixels: torch.Tensor, seed: int, indices) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x + u) / 256 * 2 - 1``, u ~ U[0, 1) per sample from (seed, index)."""
    u = per_sample_draws(seed, indices, pixels.shape[1:], uniform=True)
    return ((pixels.double() + u.double()) / 128.0 - 1.0).float()


def model_input(ready: ReadyModel, images: np.ndarray, seed: int, indices) -> torch.Tensor:
    """What the network models, for images of the file: dequantised pixels, or latents of the autoencoder."""
    shape, ae = tuple(ready.image_shape), ready.autoencoder
    wanted = shape if ae is None else (3, *(side * ae.downsample for side in shape[1:]))
    pixels = model_pixels(images, wanted[0])
    if tuple(pixels.shape[1:]) != wanted:
        raise InputError(f"the model takes {'x'.join(map(str, wanted))} images (C x H x W); the file holds "
                         f"{'x'.join(map(str, images.shape[1:]))} (H x W x C)")
    if ae is None:
        return dequantize(pixels, seed, indices)
    noise = per_sample_draws(seed, indices, shape, uniform=False).to(ae.device)
    return ae.encode(pixels.float().div(127.5).sub(1.0).to(ae.device), noise=noise)


# ----------------------------------------------------------------------------------------------------------
# The estimate and its record
# ----------------------------------------------------------------------------------------------------------


def bits_per_dim(ready: ReadyModel, images: np.ndarray, labels: np.ndarray | None, *, solver: dict, options: dict,
                 seed: int, batch_size: int, device, progress: bool = False) -> np.ndarray:
    """Bits/dim of every image (float64 (N,)): pixels on the 8-bit grid, latents without one. ``solver``: the
    ``sampler`` and ``steps`` keywords of ``Transport.likelihood`` (an adaptive solver's also ``atol``, ``rtol``);
    ``options``: its divergence keywords (:func:`divergence_options`)."""
    levels = None if ready.autoencoder is not None else 256
    model = ready.model.requires_grad_(False)
    out = []
    with tqdm(total=len(images), desc="likelihood", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(images), batch_size):
            indices = range(start, min(start + batch_size, len(images)))
            x = model_input(ready, images[indices.start:indices.stop], seed, indices).to(device)
            cond = {} if labels is None else {"y": torch.from_numpy(labels[indices.start:indices.stop]).to(device)}
            _, bpd = ready.objective.likelihood(model, x, cond, **solver, **options, levels=levels, data_range=2.0,
                                                randn=PerSampleNoise(seed, indices))
            out.append(bpd.double().cpu().numpy())
            bar.update(len(indices))
    return np.concatenate(out)


def describe_solver(solver: dict, options: dict) -> str:
    """One phrase for the solver and the divergence, e.g. "heun2 (3 grid points), exact divergence" (an adaptive
    solver's ``solver`` holds its tolerances, a fixed-step one's none)."""
    method = solver["sampler"]
    ode = f"{method} (atol {solver['atol']:g}, rtol {solver['rtol']:g})" if "atol" in solver else \
        f"{method} ({solver['steps']} grid points)"
    if options["divergence"] == "exact":
        return f"{ode}, exact divergence"
    probes = f"{options['probes']} {options['probe']} probe{'s' * (options['probes'] > 1)}"
    return f"{ode}, Hutchinson divergence ({probes}){' resampled at every evaluation' * options['resample_probes']}"


def likelihood_report(ready: ReadyModel, images: np.ndarray, labels: np.ndarray | None, *, data: str | Path,
                      solver: dict, options: dict, seed: int, batch_size: int, device, progress: bool = False) -> dict:
    """The JSON record of the bits/dim of ``images`` (``load_data`` of the file ``data``): mean, standard error (None
    for one sample), n, every sample's value, the settings (``solver``, ``options``, space, data, seed, weights) and
    the checkpoint."""
    bpd = bits_per_dim(ready, images, labels, solver=solver, options=options, seed=seed, batch_size=batch_size,
                       device=device, progress=progress)
    settings = {**solver, **options, "space": PIXEL_SPACE if ready.autoencoder is None else LATENT_SPACE,
                "data": str(Path(data).resolve()), "seed": seed, "guidance": "none (unguided)",
                "weights": "EMA" if ready.weights == "ema" else "raw"}
    count = len(bpd)
    stderr = float(bpd.std(ddof=1) / math.sqrt(count)) if count > 1 else None
    return {"bits_per_dim": float(bpd.mean()), "stderr": stderr, "n": count, "per_sample": bpd.tolist(),
            "settings": settings, "ckpt": str(ready.source)}


def write_report(out: str | Path, result: dict) -> None:
    """``result`` as indented JSON at ``out``, atomically (parent folders made)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
