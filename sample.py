"""Sample from any checkpoint: a labelled PNG grid, or a resumable many-process .npz for FID.

    python sample.py --ckpt=runs/digits_uvit                               # grid.png, one row per class
    python sample.py --ckpt=DiT-XL-2-256x256.pt --labels=207,360,387 --out=dogs.png
    python sample.py --ckpt=mscoco_uvit_small.pth --prompts "a red bus" "two dogs on a beach"
    accelerate launch --num_processes=8 sample.py --ckpt=imagenet256_uvit_huge.pth --out=samples.npz \\
        --n_samples=50000 [--png_dir=samples/] [--label_dist=uniform|balanced|train_freq]

--ckpt is a trainer checkpoint (checkpoints/step_XXXXXXXX) or run directory (its newest checkpoint; the config is
read from it: --config is refused, --config.key=value overrides apply), a released file known by name (see
`python -m diffusion.released`; its config comes from that table), or any other weights file in the original
formats (U-ViT .pth state_dict, DiT / SiT .pt EMA state_dict or {"model", "ema", "opt", "args"} training checkpoint,
.safetensors) together with --config=configs/<name>.py. EMA weights unless --ema=false.

Sampler settings default to the config's `sample` section (the paper's sampler for the paper configs); the
sampler flags override them. Guidance w is eps_u + w (eps_c - eps_u); U-ViT's papers write s = w - 1.
--guide=CKPT (a checkpoint or run dir, a released name, or a weights file with --guide_config) is autoguidance
instead: out_guide + w (out_model - out_guide), the guide a smaller or shorter-trained model of the same space:

    python sample.py --ckpt runs/digits_uvit --guide runs/digits_uvit_guide --guidance 2

--out=*.npz starts (or resumes) an evaluation job: --n_samples samples in chunks of --chunk_size, written to
OUT.parts/ as they finish, recorded with their settings in OUT.job.json; every process takes its share; rerun the
same command after a crash and finished chunks are kept. The result is ADM's format: arr_0 uint8 (N, H, W, 3),
arr_1 the labels (class-conditional models). Sample i depends only on (--seed, i): the file is the same for any
number of processes, and for any batch size up to floating-point rounding (bit-identical on CPU).

--likelihood=DATA.npz (transport checkpoints) computes instead the bits/dim of DATA.npz's images through the
probability-flow ODE (SiT's sample_ode_likelihood, run from data to noise) and writes them to --out=*.json (default
likelihood.json): the flags and the summary line are here, the computation is diffusion/sampling/likelihood.py's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState

from diffusion.config.cli import Arguments, Command, Flag, run_main
from diffusion.config.schema import SAMPLE_QUANTIZE
from diffusion.errors import ConfigError, InputNotFoundError
from diffusion.samplers.transport import DIVERGENCES, ODE_METHODS, PROBES
from diffusion.sampling import likelihood
from diffusion.sampling.generate import SampleSource
from diffusion.sampling.grids import sample_grid
from diffusion.sampling.jobs import SampleJob, run_job
from diffusion.sampling.loader import ReadyModel, job_settings, load_for_sampling
from diffusion.sampling.per_sample import LABEL_MODES, LabelPlan, check_labels, training_class_counts
from diffusion.sampling.settings import SAMPLER_SETTINGS

SAMPLER_GROUP = "sampler (defaults: the config's sample section)"
FLAG_NAMES = {"guidance_scale": "guidance"}  # sample-section key -> flag name, where they differ
LIKELIHOOD_GROUP = "likelihood (--likelihood=DATA.npz; transport models)"
LIKELIHOOD_FLAGS = (
    Flag("likelihood", metavar="DATA.npz", group=LIKELIHOOD_GROUP,
         help="bits/dim of DATA.npz's images (ADM's format: arr_0 uint8 (N, H, W, C), arr_1 labels) through the "
              "probability-flow ODE; writes --out=*.json (default likelihood.json)"),
    Flag("divergence", choices=DIVERGENCES, group=LIKELIHOOD_GROUP,
         help="hutchinson (estimator) or exact (one backward pass per dimension: small data) (default: hutchinson)"),
    Flag("probes", type=int, group=LIKELIHOOD_GROUP, help="Hutchinson probes per sample (default: 1)"),
    Flag("probe", choices=PROBES, group=LIKELIHOOD_GROUP, help="Hutchinson probe distribution (default: rademacher)"),
    Flag("resample_probes", type=bool, group=LIKELIHOOD_GROUP,
         help="fresh Hutchinson probes at every network evaluation, as SiT (default: false, one set per sample for "
              "its whole trajectory)"),
)
LIKELIHOOD_SOLVER_KEYS = ("sampler", "steps", "atol", "rtol")  # the sample-section keys the likelihood uses
LIKELIHOOD_OUTPUT_FLAGS = ("png_dir", "chunk_size", "quantize", "labels", "label_dist", "prompts", "prompts_file",
                           "per_class")
COMMAND = Command(__doc__, config="optional", flags=(
    Flag("ckpt", required=True, metavar="PATH", help="checkpoint dir, run dir, released file or weights file"),
    Flag("out", metavar="PATH", help="*.png: a labelled grid (default grid.png); *.npz: an evaluation job; *.json: "
         "the --likelihood report (default likelihood.json)"),
    Flag("n_samples", type=int, help="samples in an .npz job (default: sample.n_samples, 50000; U-ViT's MS-COCO "
         "30000; or the recorded job's); unconditional "
         "grid size"),
    Flag("png_dir", metavar="DIR", help="also write every sample of an .npz job as DIR/000000.png ..."),
    Flag("batch_size", 64, int, help="samples per network batch and process"),
    Flag("chunk_size", type=int, help="samples per chunk file of an .npz job (fixed per job; 256)"),
    *(Flag(FLAG_NAMES.get(key, key), type=kind, help=text, group=SAMPLER_GROUP)
      for key, (kind, text) in SAMPLER_SETTINGS.items()),
    Flag("quantize", choices=SAMPLE_QUANTIZE, group=SAMPLER_GROUP, help="[-1, 1] -> uint8 of an .npz job's samples: "
         "round (U-ViT, DiT, SiT) or truncate (REPA's generate.py; ~0.5 grey level darker)"),
    Flag("labels", metavar="C,C,...", group="conditioning",
         help="class labels, e.g. 3,1,4: grid rows, or cycled over an .npz job"),
    Flag("label_dist", choices=LABEL_MODES, group="conditioning", help="labels of an .npz job (default: "
         "sample.labels)"),
    Flag("prompts", many="+", metavar="TEXT", group="conditioning", help="text prompts of a text-to-image model"),
    Flag("prompts_file", metavar="PATH", group="conditioning", help="one prompt per line"),
    Flag("per_class", type=int, group="conditioning", help="grid columns per class or prompt"),
    Flag("seed", type=int, group="run", help="default: sample.seed"),
    Flag("ema", True, bool, group="run", help="EMA weights (default) or the raw ones"),
    Flag("device", group="run", help="default: the process's GPU, else cpu"),
    *LIKELIHOOD_FLAGS,
))


def sample_flags(args: Arguments) -> dict:
    """The sample-section values the flags set (the sampler's, plus per_class and seed)."""
    keys = (*SAMPLER_SETTINGS, "quantize", "per_class", "seed")
    values = {key: args.values[FLAG_NAMES.get(key, key)] for key in keys}
    return {key: value for key, value in values.items() if value is not None}


def read_prompts(args: Arguments) -> list[str] | None:
    if args.prompts and args.prompts_file:
        raise ConfigError("give --prompts or --prompts_file, not both")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise InputNotFoundError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"{path} holds no prompts")
        return prompts
    return args.prompts


def parse_labels(text: str, num_classes: int) -> list[int]:
    try:
        labels = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"--labels takes class numbers separated by commas, e.g. 3,1,4; got {text!r}") from None
    check_labels(labels, num_classes)
    return labels


def check_conditioning(ready: ReadyModel, args: Arguments, prompts) -> str:
    """'text' | 'class' | 'none', refusing flags that do not fit the model."""
    kind = ready.conditioning
    label_flags = [f for f in ("labels", "label_dist") if args.values[f] is not None]
    if kind != "text" and prompts:
        raise ConfigError(f"prompts need a text-to-image model; this one is "
                          f"{'class-conditional: use --labels' if kind == 'class' else 'unconditional'}")
    if kind != "class" and label_flags:
        raise ConfigError(f"--{label_flags[0]} needs a class-conditional model; this one is "
                          f"{'text-to-image: use --prompts or --prompts_file' if kind == 'text' else 'unconditional'}")
    if kind == "text" and not prompts:
        raise ConfigError("this is a text-to-image model: give --prompts \"a photo of ...\" or --prompts_file")
    if (kind == "class" and ready.settings["guidance_scale"] != 1.0 and ready.info.null_label is None
            and ready.guide is None):  # autoguidance needs no null label
        raise ConfigError("guidance needs a model trained with a null label; this one has none: use --guidance 1 "
                          "(or autoguidance: --guide=CKPT)")
    return kind


def check_out(args: Arguments) -> bool:
    """Whether --out is an .npz job; refuses flags that belong to the other kind of output."""
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ConfigError(f"--out must end in .png (a grid) or .npz (an evaluation job) (.json: with --likelihood), "
                          f"got {out}")
    npz = out.suffix == ".npz"
    if not npz and (args.png_dir or args.label_dist or args.chunk_size):
        raise ConfigError("--png_dir, --label_dist and --chunk_size belong to .npz jobs (--out=samples.npz)")
    if not npz and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a grid is drawn by one process; launch several only for --out=*.npz jobs")
    return npz


def describe(ready: ReadyModel) -> str:
    settings, seed = ready.settings, ready.config.sample.seed
    weights = "EMA" if ready.weights == "ema" else "raw"
    channels = "" if settings["guidance_channels"] == "all" else f" on {settings['guidance_channels']} channels"
    guide = f" by the guide {ready.guide_source.name}" if ready.guide is not None else ""
    return (f"from {ready.source.name} ({weights} weights), {settings['sampler']} {settings['steps']} steps, guidance "
            f"{settings['guidance_scale']:g}{channels}{guide}, seed {seed}")


def draw_grid(ready: ReadyModel, args: Arguments, given, prompts, device) -> str:
    path = sample_grid(ready.model, ready.objective, ready.config.sample, ready.image_shape, Path(args.out),
                       class_names=ready.meta.get("class_names"), classes=given, prompts=prompts,
                       text_encoder=ready.text_encoder, decode=ready.decode, num=args.n_samples,
                       batch_size=args.batch_size, device=device, progress=True, guide=ready.guide)
    return f"wrote {path}: grid {describe(ready)}"


def run_npz_job(ready: ReadyModel, args: Arguments, given, prompts, dist_state, device) -> str:
    config, out = ready.config, Path(args.out)
    labels = None
    if ready.conditioning == "class":
        mode = "given" if given else args.label_dist or config.sample.labels
        counts = training_class_counts(config, ready.meta) if mode == "train_freq" else None
        labels = LabelPlan(mode, ready.info.num_labels, seed=config.sample.seed, given=given,
                           class_counts=counts)
    job = SampleJob.open(out, args.n_samples, job_settings(ready, labels, prompts), chunk_size=args.chunk_size,
                         default_num_samples=config.sample.get("n_samples", 50_000))
    if job.done():
        return f"{out} is already complete ({job.num_samples} samples, {job.record}); nothing to do"
    drawer = SampleSource(ready.model, ready.objective, config.sample, ready.image_shape, seed=config.sample.seed,
                          labels=labels, prompts=prompts, text_encoder=ready.text_encoder, decode=ready.decode,
                          device=device, guide=ready.guide)
    stats = run_job(job, drawer.uint8, batch_size=min(args.batch_size, job.chunk_size), state=dist_state,
                    png_dir=args.png_dir)
    if not dist_state.is_main_process:
        return ""
    cond = f"labels {labels.mode}" if labels else f"{len(prompts)} prompts" if prompts else "unconditional"
    return (f"wrote {out}: {job.num_samples} samples of {'x'.join(map(str, stats['shape'][1:]))} "
            f"({stats['reused_chunks']} of {job.num_chunks} chunks reused, {stats['drawn_chunks']} drawn by "
            f"{dist_state.num_processes} process(es) at {stats['images_per_second']:.1f} img/s) {describe(ready)}, "
            f"{cond}{f'; PNGs in {args.png_dir}' if args.png_dir else ''}")


# ----------------------------------------------------------------------------------------------------------
# --likelihood=DATA.npz: its flags here, the computation in diffusion/sampling/likelihood.py
# ----------------------------------------------------------------------------------------------------------


def likelihood_options(args: Arguments) -> dict:
    """The divergence keywords of Transport.likelihood from --divergence, --probes, --probe, --resample_probes (the
    flags given, else their defaults). Refuses them without --likelihood, and the probe flags with exact."""
    given = {key: args.values.get(key) for key in likelihood.DIVERGENCE_DEFAULTS if args.values.get(key) is not None}
    if given and not args.likelihood:
        raise ConfigError(f"--{', --'.join(given)} belong to --likelihood=DATA.npz")
    options = {**likelihood.DIVERGENCE_DEFAULTS, **given}
    probe_flags = [key for key in given if key != "divergence"]
    if options["divergence"] == "exact" and probe_flags:
        raise ConfigError(f"--{', --'.join(probe_flags)} set Hutchinson's estimator; --divergence=exact draws no "
                          f"probes")
    if options["probes"] < 1:
        raise ConfigError(f"--probes must be >= 1, got {options['probes']}")
    return likelihood.divergence_options(**options)


def check_likelihood_flags(args: Arguments) -> Path:
    """The .json output path; refuses what does not apply to a likelihood: other outputs, conditioning and sampler
    flags, guidance other than 1, several processes."""
    out = Path(args.out or "likelihood.json")
    if out.suffix != ".json":
        raise ConfigError(f"--likelihood writes a JSON report: --out must end in .json (default likelihood.json), "
                          f"got {out}")
    foreign = [key for key in SAMPLER_SETTINGS if key not in LIKELIHOOD_SOLVER_KEYS and key != "guidance_scale"]
    given = [name for name in (*LIKELIHOOD_OUTPUT_FLAGS, *foreign) if args.values.get(name) not in (None, [])]
    if given:
        raise ConfigError(f"--{given[0]} does not apply to --likelihood (it takes --sampler (an ODE method), "
                          f"--steps, --atol, --rtol, --divergence, --probes, --probe, --resample_probes, "
                          f"--n_samples, --batch_size)")
    guidance = args.values.get(FLAG_NAMES["guidance_scale"])
    if guidance is not None and guidance != 1.0:
        raise ConfigError(f"the likelihood is that of the unguided model (SiT asserts cfg_scale == 1): drop "
                          f"--guidance={guidance:g} or use --guidance=1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--likelihood runs in one process; launch it without accelerate/torchrun")
    return out


def likelihood_solver(args: Arguments, config) -> dict:
    """sampler and steps (and an adaptive method's atol, rtol): the flags, else the config's sample section; a
    sampler that is not an ODE method (an SDE, the config's default elsewhere) falls back to SiT's likelihood solver
    dopri5 unless given. Tolerances given for a fixed-step method are refused."""
    sample = config.sample
    sampler = args.sampler or (sample.sampler if sample.sampler in ODE_METHODS else "dopri5")
    if sampler not in ODE_METHODS:
        raise ConfigError(f"--likelihood integrates the probability-flow ODE: --sampler must be one of "
                          f"{', '.join(ODE_METHODS)}, got {sampler!r}")
    value = {key: args.values.get(key) if args.values.get(key) is not None else sample[key]
             for key in LIKELIHOOD_SOLVER_KEYS[1:]}
    if value["steps"] < 2:
        raise ConfigError(f"--steps counts grid points (SiT's num_steps) and must be >= 2, got {value['steps']}")
    if not ODE_METHODS[sampler]:
        tolerances = [key for key in ("atol", "rtol") if args.values.get(key) is not None]
        if tolerances:
            raise ConfigError(f"--{tolerances[0]} is a tolerance of the adaptive ODE methods "
                              f"({', '.join(m for m, adaptive in ODE_METHODS.items() if adaptive)}); {sampler} "
                              f"takes the {value['steps']} grid points of --steps")
        return {"sampler": sampler, "steps": value["steps"]}
    if not (value["atol"] > 0 and value["rtol"] > 0):
        raise ConfigError(f"atol and rtol must be > 0, got {value['atol']!r} and {value['rtol']!r}")
    return {"sampler": sampler, **value}


def likelihood_summary(out: Path, result: dict, ready: ReadyModel, args: Arguments) -> str:
    settings = result["settings"]
    err = "n/a" if result["stderr"] is None else f"{result['stderr']:.4f}"
    space = "8-bit pixels" if settings["space"] == likelihood.PIXEL_SPACE else \
        "autoencoder latents: continuous, not comparable with pixel bits/dim"
    return (f"wrote {out}: {result['bits_per_dim']:.4f} ± {err} bits/dim (N={result['n']}, {space}) of "
            f"{Path(args.likelihood).name} under {ready.source.name} ({settings['weights']} weights, unguided), "
            f"{likelihood.describe_solver(settings, settings)}, seed {settings['seed']}")


def run_likelihood(args: Arguments) -> str:
    """``--likelihood=DATA.npz``: check the flags, load, estimate, write the JSON; returns the summary line."""
    start = time.perf_counter()
    out, options = check_likelihood_flags(args), likelihood_options(args)
    ready = load_for_sampling(args.ckpt, config_path=args.config_path, overrides=args.overrides, ema=args.ema,
                              codecs=False, check_sampler=False)  # the likelihood takes its own solver settings
    likelihood.check_model(ready)
    solver = likelihood_solver(args, ready.config)
    images, labels = likelihood.load_data(ready, args.likelihood, args.n_samples)
    seed = ready.config.sample.seed if args.seed is None else args.seed
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = likelihood.likelihood_report(ready.with_codecs(device), images, labels, data=args.likelihood,
                                          solver=solver, options=options, seed=seed, batch_size=args.batch_size,
                                          device=device, progress=True)
    result["settings"]["seconds"] = round(time.perf_counter() - start, 3)
    likelihood.write_report(out, result)
    return likelihood_summary(out, result, ready, args)


def run(args: Arguments) -> int:
    """Load, check, sample; prints the summary line (on rank 0)."""
    start = time.perf_counter()
    if args.likelihood:
        print(f"{run_likelihood(args)} [{time.perf_counter() - start:.1f} s]")
        return 0
    likelihood_options(args)  # refuses the likelihood flags without --likelihood
    args.values["out"] = args.out or "grid.png"
    npz = check_out(args)
    ready = load_for_sampling(args.ckpt, config_path=args.config_path, overrides=args.overrides,
                              sample=sample_flags(args), ema=args.ema, codecs=False)
    prompts = read_prompts(args)
    check_conditioning(ready, args, prompts)
    given = parse_labels(args.labels, ready.info.num_labels) if args.labels else None
    dist_state = None
    if npz:
        dist_state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
        device = torch.device(args.device) if args.device else dist_state.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ready.with_codecs(device)
    summary = run_npz_job(ready, args, given, prompts, dist_state, device) if npz else \
        draw_grid(ready, args, given, prompts, device)
    if summary:
        print(f"{summary} [{time.perf_counter() - start:.1f} s]")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
