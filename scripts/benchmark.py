"""Training and sampling throughput, peak memory, FLOPs and MFU of any config or preset, speed options side by side.

    python scripts/benchmark.py --preset DiT-S/2 --batch 8 32                  # fp32/bf16 x plain/fast, training
    python scripts/benchmark.py --config configs/cifar10_uvit_s2.py --task sample --nfe 50 --guidance 1
    python scripts/benchmark.py --preset U-ViT-S/2 --precision bf16 --options plain fast compiled
    python scripts/benchmark.py --preset DiT-S/2 --precision bf16 --options plain \\
        --variant bf16-math:precision=bf16,options=plain,attention=math   # one option at a time
    python scripts/benchmark.py --config configs/imagenet256_dit_xl2.py --set model.preset=DiT-S/2 \\
        --latent-fixture /tmp/latent_bench                # cached latents vs SD-VAE encoding at every step
    python scripts/benchmark.py --preset DiT-XL/2 --batch 4 --precision fp32 --options fast \\
        --variant ckpt:options=fast,checkpointing=true    # gradient checkpointing: peak memory

Option sets (--options): plain = SDPA attention, torch's default AdamW loop, glibc's allocator (the path before any
speed work); fast = the trainer's defaults (attention auto, fused AdamW, freed memory kept in the heap); compiled =
fast + torch.compile. --variant NAME:key=value,... builds any other mix (keys: precision, options, attention,
optimizer, reuse_memory, compile, checkpointing, channels_last, tf32, data, or a dotted config key). Each variant runs
in its own process; repeats are interleaved; the JSON (--json) holds every repeat, the machine and library versions.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.tools.benchmark import (
    OPTION_SETS,
    PRECISIONS,
    Setup,
    Variant,
    add_mfu,
    add_speedups,
    machine_info,
    matmul_peak,
    parse_variant,
    prepare_latent_fixture,
    run_comparison,
    standard_variants,
    summary_line,
    write_report,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="a config file (configs/...)")
    what.add_argument("--preset", help="a backbone preset, e.g. U-ViT-S/2 or DiT-S/2, with its default data shape")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as --config.KEY=VALUE of train.py (repeatable)")
    parser.add_argument("--task", nargs="+", default=["train"], choices=["train", "sample"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--options", nargs="*", default=None, choices=list(OPTION_SETS),
                        help="option sets to cross with --precision (default: plain fast; none with --variant)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repeat (train)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (compilation happens here)")
    parser.add_argument("--nfe", type=int, default=0, help="sampling steps; 0 = the config's sample.steps")
    parser.add_argument("--sampler", default="", help="sampler; empty = the config's sample.sampler")
    parser.add_argument("--guidance", type=float, default=0.0, help="guidance scale; 0 = the config's, 1 = off")
    parser.add_argument("--device", default="", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    parser.add_argument("--latent-fixture", default="", metavar="DIR",
                        help="compare cached latents with on-the-fly SD-VAE encoding, data read from DIR (built once)")
    parser.add_argument("--fixture-images", type=int, default=16)
    parser.add_argument("--json", default="", help="write every measurement here")
    return parser.parse_args(argv)


def build_variants(args: argparse.Namespace, fixture: dict | None) -> list[Variant]:
    options = args.options if args.options is not None else ([] if args.variant or fixture else ["plain", "fast"])
    variants = standard_variants(args.precision, options) + [parse_variant(spec) for spec in args.variant]
    if fixture:
        base = variants or standard_variants(args.precision[:1], ["fast"])
        variants = [Variant(**{**vars(v), "name": f"{v.name}-{kind}", "data": "loader", "config": {**v.config, **o}})
                    for v in base for kind, o in fixture.items()]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    return variants


def main(argv: list[str]) -> int:
    import torch

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        overrides = dict(item.split("=", 1) for item in args.set)
    except ValueError:
        print(f"error: --set takes KEY=VALUE, got {args.set}", file=sys.stderr)
        return 2
    try:
        fixture = prepare_latent_fixture(args.latent_fixture, images=args.fixture_images) if args.latent_fixture \
            else None
        variants = build_variants(args, fixture)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = machine_info(device)
    precisions = sorted({v.precision for v in variants})
    peaks = {p: matmul_peak(PRECISIONS[p], device) for p in precisions}
    results = []
    for task in args.task:
        for batch in args.batch:
            setup = Setup(config_path=args.config or "", preset=args.preset or "", overrides=overrides, task=task,
                          batch=batch, steps=args.steps, nfe=args.nfe, sampler=args.sampler, guidance=args.guidance,
                          device=device, threads=args.threads)
            try:
                results += run_comparison(setup, variants, repeats=args.repeats, warmup=args.warmup,
                                          progress=lambda text: print(text, file=sys.stderr))
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    # the best of a measurement before and one after: a peak disturbed by anything else running would inflate MFU
    peaks = {p: max(peaks[p], matmul_peak(PRECISIONS[p], device)) for p in precisions}
    print("[benchmark] matmul peak " + ", ".join(f"{p} {v / 1e12:.2f} TFLOP/s" for p, v in peaks.items()),
          file=sys.stderr)
    add_speedups(results)
    add_mfu(results, peaks)
    for r in results:
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "   n/a"
        print(f"{r['task']:6} b{r['batch']:<4} {r['variant']:28} {r['images_per_s']:9.2f} img/s  x{r['speedup']:.2f} "
              f"vs {r['baseline']:14} MFU {mfu}  network {100 * r['network_share']:5.1f}%  "
              f"peak {r['peak_memory_mb']:8.0f} MB")
    print(summary_line(results, info))
    if args.json:
        write_report(args.json, results, info, peaks, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
