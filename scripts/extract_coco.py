"""Cache MS-COCO 2014 for text-to-image training: the autoencoder moments of every image (centre square, Lanczos)
and the CLIP last hidden state of every caption, plus the empty caption's encoding and the captions as text.

    accelerate launch scripts/extract_coco.py --root data/coco --split train --out data/mscoco256_features/train \\
        --autoencoder assets/stable-diffusion/autoencoder_kl.pth --clip openai/clip-vit-large-patch14

ROOT holds train2014/, val2014/ and annotations/captions_{train,val}2014.json. Same sharded, multi-process, resumable
machinery as scripts/extract_latents.py (also its --repa_encoders: REPA's targets of every image). Train on the
result with --config.data.name=coco_latents --config.data.root=OUT.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any working directory

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.data.datasets import COCO_SPLITS  # noqa: E402
from diffusion.data.extraction import extract_coco  # noqa: E402
from scripts._extraction_flags import extraction_flags  # noqa: E402

COMMAND = Command(__doc__, config="none", overrides=False, flags=(
    Flag("root", required=True, metavar="DIR", help="MS-COCO folder with {train,val}2014/ and annotations/"),
    Flag("split", required=True, choices=COCO_SPLITS, help="which captioned images"),
    Flag("clip", required=True, metavar="PATH", help="CLIP text encoder: hub id or local folder"),
    Flag("max_length", 77, int, help="caption tokens (padded)"),
    *extraction_flags(scale_factor=0.23010),
))


def run(args: Arguments) -> int:
    kwargs = dict(args.values)
    manifest = extract_coco(kwargs.pop("root"), kwargs.pop("split"), kwargs.pop("out"), **kwargs)
    if manifest is not None:
        counts = manifest["counts"]
        print(f"{counts['images']} images, {counts['captions']} captions ({counts['skipped']} skipped) "
              f"in {len(manifest['shards'])} shards")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
