"""Cache MS-COCO 2014 for text-to-image training: the autoencoder moments of every image (centre square, Lanczos)
and the CLIP last hidden state of every caption, plus the empty caption's encoding and the captions as text.

    accelerate launch scripts/extract_coco.py --root data/coco --split train --out data/mscoco256_features/train \\
        --autoencoder assets/stable-diffusion/autoencoder_kl.pth --clip openai/clip-vit-large-patch14

ROOT holds train2014/, val2014/ and annotations/captions_{train,val}2014.json. Same sharded, multi-process, resumable
machinery as scripts/extract_latents.py. Train on the result with --config.data.name=coco_latents
--config.data.root=OUT.
"""

import argparse
import sys

from diffusion.data.datasets import COCO_SPLITS
from diffusion.data.extraction import add_extraction_arguments, extract_coco
from diffusion.errors import CorruptImageError, DatasetNotFoundError, WeightsNotFoundError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="MS-COCO folder with {train,val}2014/ and annotations/")
    parser.add_argument("--split", required=True, choices=COCO_SPLITS)
    parser.add_argument("--clip", required=True, help="CLIP text encoder: hub id or local folder")
    parser.add_argument("--max_length", type=int, default=77, help="caption tokens (padded)")
    add_extraction_arguments(parser, scale_factor=0.23010)
    args = vars(parser.parse_args(argv))
    try:
        manifest = extract_coco(args.pop("root"), args.pop("split"), args.pop("out"), **args)
    except (DatasetNotFoundError, WeightsNotFoundError, CorruptImageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:
        counts = manifest["counts"]
        print(f"{counts['images']} images, {counts['captions']} captions ({counts['skipped']} skipped) "
              f"in {len(manifest['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
