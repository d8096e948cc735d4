"""Training and sampling throughput, peak memory, FLOPs and MFU of any config or preset, speed options side by side.

    python scripts/benchmark.py --preset DiT-S/2 --batch 8 32                  # fp32/bf16 x plain/fast, training
    python scripts/benchmark.py --config configs/cifar10_uvit_s2.py --task sample --nfe 50 --guidance 1
    python scripts/benchmark.py --preset U-ViT-S/2 --precision bf16 --options plain fast compiled
    python scripts/benchmark.py --preset SiT-S/2 --task sample --precision bf16 --options fast --nfe 11 \
        --sampler heun2                                   # flow matching (SiT's recipe); the report gives the NFE
    python scripts/benchmark.py --preset DiT-S/2 --precision bf16 --options plain \\
        --variant bf16-math:precision=bf16,options=plain,attention=math   # one option at a time
    python scripts/benchmark.py --config configs/imagenet256_dit_xl2.py --config.model.preset=DiT-S/2 \\
        --latent_fixture /tmp/latent_bench                # cached latents vs SD-VAE encoding at every step
    python scripts/benchmark.py --preset DiT-XL/2 --batch 4 --precision fp32 --options fast \\
        --variant ckpt:options=fast,checkpointing=true    # gradient checkpointing: peak memory

--config=FILE or --preset NAME says what to run; --config.KEY=VALUE overrides apply to either (as in train.py).
Option sets (--options): plain = SDPA attention, torch's default AdamW loop, glibc's allocator (the path before any
speed work); fast = the trainer's defaults (attention auto, fused AdamW, freed memory kept in the heap); compiled =
fast + torch.compile. --variant NAME:key=value,... builds any other mix (keys: precision, options, attention,
optimizer, reuse_memory, compile, checkpointing, channels_last, tf32, data, or a dotted config key). Each variant runs
in its own process; repeats are interleaved; the JSON (--json) holds every repeat, the machine and library versions.
The matmul peak behind MFU is measured in a couple of seconds, before and after the runs (the better one counts).
Presets build their family's recipe: U-ViT-* vp_sde, DiT-* DiT's (iddpm), SiT-* SiT's flow matching (transport).
--nfe is the sampler's steps setting, which for the transport samplers is not the number of network evaluations
(grid points; heun2 2 per step, the SDE samplers 2 per drift, dopri5 adaptive): sampling results report the NFE made.

Exit status: 0 done; 1 a variant failed in its worker (the message names it); 2 bad flags or config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any working directory

import torch  # noqa: E402

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.errors import ConfigError  # noqa: E402
from diffusion.tools.benchmark import (  # noqa: E402
    OPTION_SETS,
    PRECISIONS,
    Setup,
    Variant,
    add_mfu,
    add_speedups,
    build_config,
    machine_info,
    parse_variant,
    run_comparison,
    standard_variants,
    summary_line,
    write_report,
)
from diffusion.tools.flops import matmul_peak  # noqa: E402
from diffusion.tools.latent_fixture import prepare_latent_fixture  # noqa: E402
from diffusion.training.speed import cpu_has_native_bf16  # noqa: E402

EXIT_VARIANT_FAILED = 1
COMMAND = Command(__doc__, config="optional", flags=(
    Flag("preset", metavar="NAME", help="a backbone preset, e.g. U-ViT-S/2, DiT-S/2 or SiT-S/2, with its default "
         "data shape and its family's recipe (instead of --config)"),
    Flag("task", ["train"], many="+", choices=("train", "sample")),
    Flag("batch", [8], int, many="+"),
    Flag("precision", ["fp32", "bf16"], many="+", choices=tuple(PRECISIONS)),
    Flag("options", many="*", choices=tuple(OPTION_SETS),
         help="option sets to cross with --precision (default: plain fast; none with --variant)"),
    Flag("variant", many="append", metavar="NAME:KEY=VALUE,...", help="one more variant"),
    Flag("steps", 1, int, help="optimizer steps per timed repeat (train)"),
    Flag("repeats", 5, int),
    Flag("warmup", 2, int, help="untimed repeats first (compilation happens here)"),
    Flag("nfe", 0, int, help="the sampler's steps setting; the report gives the evaluations made (0 = the "
         "config's sample.steps)"),
    Flag("sampler", "", help="sampler; empty = the config's sample.sampler"),
    Flag("guidance", 0.0, float, help="guidance scale; 0 = the config's, 1 = off"),
    Flag("device", "", help="cpu | cuda (default: cuda when available)"),
    Flag("threads", 0, int, help="torch threads per worker (default: torch's)"),
    Flag("latent_fixture", "", metavar="DIR",
         help="compare cached latents with on-the-fly SD-VAE encoding, data read from DIR (built once)"),
    Flag("fixture_images", 16, int, help="images of the latent fixture"),
    Flag("json", "", metavar="PATH", help="write every measurement here"),
))


def build_variants(args: Arguments, fixture: dict | None) -> list[Variant]:
    options = args.options if args.options is not None else ([] if args.variant or fixture else ["plain", "fast"])
    variants = standard_variants(args.precision, options) + [parse_variant(spec) for spec in args.variant or []]
    if fixture:
        base = variants or standard_variants(args.precision[:1], ["fast"])
        variants = [Variant(**{**vars(v), "name": f"{v.name}-{kind}", "data": "loader", "config": {**v.config, **o}})
                    for v in base for kind, o in fixture.items()]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names must differ: {names}")
    return variants


def setups(args: Arguments, device: str) -> list[Setup]:
    """One Setup per task and batch size; the config (file or preset, with the overrides) is built once here so that
    a bad key fails before any worker starts."""
    if bool(args.config_path) == bool(args.preset):
        raise ConfigError("give --config=FILE or --preset NAME (one of them)")
    common = dict(config_path=args.config_path or "", preset=args.preset or "", overrides=dict(args.overrides),
                  steps=args.steps, nfe=args.nfe, sampler=args.sampler, guidance=args.guidance, device=device,
                  threads=args.threads)
    build_config(Setup(**common), Variant(name="check"))
    return [Setup(**common, task=task, batch=batch) for task in args.task for batch in args.batch]


def print_results(results: list[dict], info: dict) -> None:
    for r in results:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "   n/a"
        made = f"  {r['sampler']} steps {r['sampler_steps']}: NFE {r['nfe']}" if r["nfe"] is not None else ""
        print(f"{r['task']:6} b{r['batch']:<4} {r['variant']:28} {r['images_per_s']:9.2f} img/s  x{r['speedup']:.2f} "
              f"vs {r['baseline']:14} MFU {mfu}  network {100 * r['network_share']:5.1f}%  "
              f"peak {r['peak_memory_mb']:8.0f} MB{made}")
    print(summary_line(results, info))


def run(args: Arguments) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    runs = setups(args, device)
    fixture = prepare_latent_fixture(args.latent_fixture, images=args.fixture_images) if args.latent_fixture \
        else None
    variants = build_variants(args, fixture)
    precisions = sorted({v.precision for v in variants})
    if device == "cpu" and "bf16" in precisions and not cpu_has_native_bf16():
        print("[benchmark] note: this CPU has no native bf16 (no avx512_bf16 / amx_bf16); torch emulates it, so the "
              "bf16 variants run far slower here than on a CPU or GPU with bf16 units", file=sys.stderr)
    info = machine_info(device)
    peaks = {p: matmul_peak(PRECISIONS[p], device) for p in precisions}
    results = []
    for setup in runs:
        try:
            results += run_comparison(setup, variants, repeats=args.repeats, warmup=args.warmup,
                                      progress=lambda text: print(text, file=sys.stderr))
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_VARIANT_FAILED
    # the best of a measurement before and one after: a peak disturbed by anything else running would inflate MFU
    peaks = {p: max(peaks[p], matmul_peak(PRECISIONS[p], device)) for p in precisions}
    print("[benchmark] matmul peak " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()),
          file=sys.stderr)
    add_speedups(results)
    add_mfu(results, peaks)
    print_results(results, info)
    if args.json:
        write_report(args.json, results, info, peaks, {**args.values, "config": args.config_path,
                                                       "overrides": dict(args.overrides)})
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
