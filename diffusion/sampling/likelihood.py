"""Bits per dimension of data under a transport checkpoint: ``sample.py --likelihood=DATA.npz``.

SiT's ``sample_ode_likelihood`` from the command line: the images of an ADM-format ``.npz`` (``arr_0`` uint8
(N, H, W, C), ``arr_1`` the labels of a class-conditional model) are run from data to noise through the unguided
probability-flow ODE of the checkpoint's network (:meth:`diffusion.objectives.transport.Transport.likelihood`,
``dopri5`` | ``euler`` | ``heun2``, divergence ``hutchinson`` or ``exact``), and the result is written as JSON.

* **Pixel models**: image x (uint8) -> ``(x + u) / 256 * 2 - 1`` with uniform dequantisation noise u ~ U[0, 1),
  and bits/dim on the 8-bit grid (``levels=256, data_range=2``: the negative log-likelihood of the discrete
  image, an upper bound through the dequantisation, as SiT and the flow literature report it). Grey models read
  3-channel files whose channels are equal (what ``sample.py --out=*.npz`` writes for them).
* **Latent models** (``config.autoencoder`` set): images -> a posterior sample of the config's autoencoder
  (``scale_factor * z``, the network's training input), and bits/dim of those continuous latents (no ``levels``):
  not comparable with pixel bits/dim, and the output says so.

Sample i's randomness depends only on (seed, i): its dequantisation noise or posterior draw from stream
``DATA_STREAM`` of ``per_sample.index_seed``, its Hutchinson probes from ``PerSampleNoise`` (stream 0). With the
fixed-step solvers (and exact divergences) a sample's result is therefore the same in any batch, up to
floating-point rounding; ``dopri5`` chooses one step sequence for the whole batch, so there it agrees across batch
sizes only to within the solver's tolerances. One process: several are refused.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion.config.cli import Arguments, Flag
from diffusion.errors import ConfigError, InputError, InputNotFoundError
from diffusion.files import write_atomic
from diffusion.samplers.transport import DIVERGENCES, ODE_METHODS, PROBES
from diffusion.sampling.generate import SAMPLER_SETTINGS, num_real_classes
from diffusion.sampling.loader import ReadyModel, load_for_sampling
from diffusion.sampling.per_sample import PerSampleNoise, check_labels, index_seed

GROUP = "likelihood (--likelihood=DATA.npz; transport models)"
DEFAULTS = {"divergence": "hutchinson", "probes": 1, "probe": "rademacher"}
FLAGS = (
    Flag("likelihood", metavar="DATA.npz", group=GROUP,
         help="bits/dim of DATA.npz's images (ADM's format: arr_0 uint8 (N, H, W, C), arr_1 labels) through the "
              "probability-flow ODE; writes --out=*.json (default likelihood.json)"),
    Flag("divergence", choices=DIVERGENCES, group=GROUP,
         help="hutchinson (estimator) or exact (one backward pass per dimension: small data) (default: hutchinson)"),
    Flag("probes", type=int, group=GROUP, help="Hutchinson probes per sample (default: 1)"),
    Flag("probe", choices=PROBES, group=GROUP, help="Hutchinson probe distribution (default: rademacher)"),
)
DATA_STREAM = 3  # per-sample stream of the dequantisation noise / posterior draw (0: probes, 1 and 2: labels)
SOLVER_KEYS = ("sampler", "steps", "atol", "rtol")  # the sample-section keys the likelihood uses
GUIDANCE_FLAG = "guidance"  # sample.py's flag of guidance_scale
PIXEL_SPACE = "pixels: bits/dim on the 8-bit grid, uniformly dequantised"
LATENT_SPACE = ("latents: a posterior sample of the autoencoder, bits/dim of continuous latents (no 8-bit grid; "
                "not comparable with pixel bits/dim)")
OUTPUT_FLAGS = ("png_dir", "chunk_size", "labels", "label_dist", "prompts", "prompts_file", "per_class")


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------


def likelihood_options(args: Arguments) -> dict:
    """divergence, probes and probe: the flags given, else their defaults. Refuses them without --likelihood."""
    given = {key: args.values.get(key) for key in DEFAULTS if args.values.get(key) is not None}
    if given and not args.likelihood:
        raise ConfigError(f"--{', --'.join(given)} belong to --likelihood=DATA.npz")
    options = {**DEFAULTS, **given}
    if options["probes"] < 1:
        raise ConfigError(f"--probes must be >= 1, got {options['probes']}")
    return options


def check_flags(args: Arguments) -> Path:
    """The .json output path; refuses what does not apply to a likelihood: other outputs, conditioning and sampler
    flags, guidance other than 1, several processes."""
    out = Path(args.out or "likelihood.json")
    if out.suffix != ".json":
        raise ConfigError(f"--likelihood writes a JSON report: --out must end in .json (default likelihood.json), "
                          f"got {out}")
    foreign = [key for key in SAMPLER_SETTINGS if key not in SOLVER_KEYS and key != "guidance_scale"]
    given = [name for name in (*OUTPUT_FLAGS, *foreign) if args.values.get(name) not in (None, [])]
    if given:
        raise ConfigError(f"--{given[0]} does not apply to --likelihood (it takes --sampler dopri5|euler|heun2, "
                          f"--steps, --atol, --rtol, --divergence, --probes, --probe, --n_samples, --batch_size)")
    guidance = args.values.get(GUIDANCE_FLAG)
    if guidance is not None and guidance != 1.0:
        raise ConfigError(f"the likelihood is that of the unguided model (SiT asserts cfg_scale == 1): drop "
                          f"--guidance={guidance:g} or use --guidance=1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--likelihood runs in one process; launch it without accelerate/torchrun")
    return out


def solver_settings(args: Arguments, config) -> dict:
    """sampler, steps, atol, rtol: the flags, else the config's sample section; a sampler that is not an ODE
    method (an SDE, the config's default elsewhere) falls back to SiT's likelihood solver dopri5 unless given."""
    sample = config.sample
    sampler = args.sampler or (sample.sampler if sample.sampler in ODE_METHODS else "dopri5")
    if sampler not in ODE_METHODS:
        raise ConfigError(f"--likelihood integrates the probability-flow ODE: --sampler must be one of "
                          f"{', '.join(ODE_METHODS)}, got {sampler!r}")
    settings = {"sampler": sampler, **{key: args.values.get(key) if args.values.get(key) is not None
                                       else sample[key] for key in SOLVER_KEYS[1:]}}
    if settings["steps"] < 2:
        raise ConfigError(f"--steps counts grid points (SiT's num_steps) and must be >= 2, got {settings['steps']}")
    if not (settings["atol"] > 0 and settings["rtol"] > 0):
        raise ConfigError(f"atol and rtol must be > 0, got {settings['atol']!r} and {settings['rtol']!r}")
    return settings


def check_model(ready: ReadyModel) -> None:
    """Only the transport objective has a likelihood here, and not for text-to-image models."""
    kind = ready.config.diffusion.kind
    if kind != "transport" or not hasattr(ready.objective, "likelihood"):
        raise ConfigError(f"--likelihood needs a flow-matching checkpoint (diffusion.kind=transport); this one is "
                          f"diffusion.kind={kind} ({type(ready.objective).__name__}), which has no probability-flow "
                          f"likelihood here")
    if ready.conditioning == "text":
        raise ConfigError("likelihood of text-to-image models is not supported")


# ----------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------


def read_data(path: str | Path, n: int | None, labels_needed: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images (N, H, W, C), int64 labels or None) of an ADM-format .npz, its first ``n`` if given."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"--likelihood data not found: {path}")
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
        raise ConfigError(f"--n_samples={n}: {path} holds {len(images)} images"
                          f"{'' if labels is None else f' and {len(labels)} labels'}")
    return images[:n], None if labels is None else labels[:n].astype(np.int64)


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
# The estimate
# ----------------------------------------------------------------------------------------------------------


def bits_per_dim(ready: ReadyModel, images: np.ndarray, labels: np.ndarray | None, *, solver: dict, options: dict,
                 seed: int, batch_size: int, device, progress: bool = False) -> np.ndarray:
    """Bits/dim of every image (float64 (N,)): pixels on the 8-bit grid, latents without one."""
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
    method = solver["sampler"]
    ode = f"dopri5 (atol {solver['atol']:g}, rtol {solver['rtol']:g})" if method == "dopri5" else \
        f"{method} ({solver['steps']} grid points)"
    div = "exact divergence" if options["divergence"] == "exact" else \
        f"Hutchinson divergence ({options['probes']} {options['probe']} probe{'s' * (options['probes'] > 1)})"
    return f"{ode}, {div}"


def report(ready: ReadyModel, bpd: np.ndarray, settings: dict) -> dict:
    """The JSON record: mean, standard error (None for one sample), n, every sample's value, settings, checkpoint."""
    n = len(bpd)
    stderr = float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {"bits_per_dim": float(bpd.mean()), "stderr": stderr, "n": n, "per_sample": bpd.tolist(),
            "settings": settings, "ckpt": str(ready.source)}


def load_data(ready: ReadyModel, args: Arguments) -> tuple[np.ndarray, np.ndarray | None]:
    """The file's images and, for a class-conditional model, their labels (checked against its classes)."""
    classes = num_real_classes(ready.model) if ready.conditioning == "class" else 0
    images, labels = read_data(args.likelihood, args.n_samples, labels_needed=bool(classes))
    if labels is not None:
        check_labels(sorted(set(labels.tolist())), classes)
    return images, labels


def summary_line(out: Path, result: dict, ready: ReadyModel, args: Arguments) -> str:
    settings = result["settings"]
    err = "n/a" if result["stderr"] is None else f"{result['stderr']:.4f}"
    space = "8-bit pixels" if settings["space"] == PIXEL_SPACE else \
        "autoencoder latents: continuous, not comparable with pixel bits/dim"
    return (f"wrote {out}: {result['bits_per_dim']:.4f} ± {err} bits/dim (N={result['n']}, {space}) of "
            f"{Path(args.likelihood).name} under {ready.source.name} ({settings['weights']} weights, unguided), "
            f"{describe_solver(settings, {**DEFAULTS, **settings})}, seed {settings['seed']}")


def run_likelihood(args: Arguments) -> str:
    """``sample.py --likelihood=DATA.npz``: load, check, estimate, write the JSON; returns the summary line."""
    start = time.perf_counter()
    out, options = check_flags(args), likelihood_options(args)
    ready = load_for_sampling(args.ckpt, config_path=args.config_path, overrides=args.overrides, ema=args.ema,
                              codecs=False)
    check_model(ready)
    solver = solver_settings(args, ready.config)
    images, labels = load_data(ready, args)
    seed = ready.config.sample.seed if args.seed is None else args.seed
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bpd = bits_per_dim(ready.with_codecs(device), images, labels, solver=solver, options=options, seed=seed,
                       batch_size=args.batch_size, device=device, progress=True)
    used = options if options["divergence"] == "hutchinson" else {"divergence": "exact"}
    settings = {**solver, **used, "space": PIXEL_SPACE if ready.autoencoder is None else LATENT_SPACE,
                "data": str(Path(args.likelihood).resolve()), "seed": seed, "guidance": "none (unguided)",
                "weights": "EMA" if ready.weights == "ema" else "raw", "seconds": round(time.perf_counter() - start, 3)}
    result = report(ready, bpd, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return summary_line(out, result, ready, args)
