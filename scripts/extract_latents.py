"""Cache the autoencoder moments of an ImageFolder tree (ImageNet): every image and its horizontal flip.

    accelerate launch scripts/extract_latents.py --data data/imagenet/train --out data/imagenet256_latents \\
        --resolution 256 --autoencoder stabilityai/sd-vae-ft-ema   # [--fp16]: half the disk, rounded moments
    python scripts/extract_latents.py ...     (one process)
    ... --repa_encoders dinov2-vit-b --repa_encoder_weights PATH   # also REPA's targets, for data.name=latents

Images are ADM-centre-cropped to --resolution; each process writes its own shards (shard k by rank k mod the number of
processes). Rerunning the same command after a kill resumes without redoing finished shards. Train on the result
with --config.data.name=latents --config.data.root=OUT (see diffusion/data/extraction.py for the file formats); with
--repa_encoders the shards also hold those encoders' features of every image and its flip, which REPA training
(repa.encoders, the same names and weights) reads as its targets.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any working directory

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.data.extraction import extract_imagefolder  # noqa: E402
from scripts._extraction_flags import extraction_flags  # noqa: E402

COMMAND = Command(__doc__, config="none", overrides=False, flags=(
    Flag("data", required=True, metavar="DIR", help="ImageFolder root: DATA/<class>/<image>"),
    *extraction_flags(scale_factor=0.18215),
))


def run(args: Arguments) -> int:
    kwargs = dict(args.values)
    manifest = extract_imagefolder(kwargs.pop("data"), kwargs.pop("out"), **kwargs)
    if manifest is not None:
        counts = manifest["counts"]
        print(f"{counts['images']} images ({counts['skipped']} skipped) in {len(manifest['shards'])} shards")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
