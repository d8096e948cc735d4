"""Cache the autoencoder moments of an ImageFolder tree (ImageNet): every image and its horizontal flip.

    accelerate launch scripts/extract_latents.py --data data/imagenet/train --out data/imagenet256_latents \\
        --resolution 256 --autoencoder stabilityai/sd-vae-ft-ema [--fp16]
    python scripts/extract_latents.py ...     (one process)

Images are ADM-centre-cropped to --resolution; each process writes its own shards (shard k by rank k mod the number of
processes). Rerunning the same command after a kill resumes without redoing finished shards. Train on the result
with --config.data.name=latents --config.data.root=OUT (see diffusion/latents.py for the file formats).
"""

import argparse
import sys

from diffusion.data.extraction import add_extraction_arguments, extract_imagefolder
from diffusion.errors import CorruptImageError, DatasetNotFoundError, WeightsNotFoundError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="ImageFolder root: DATA/<class>/<image>")
    add_extraction_arguments(parser, scale_factor=0.18215)
    args = vars(parser.parse_args(argv))
    try:
        manifest = extract_imagefolder(args.pop("data"), args.pop("out"), **args)
    except (DatasetNotFoundError, WeightsNotFoundError, CorruptImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:
        counts = manifest["counts"]
        print(f"{counts['images']} images ({counts['skipped']} skipped) in {len(manifest['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
