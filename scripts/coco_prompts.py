"""Write U-ViT's MS-COCO evaluation prompt set: one random caption for each of N distinct val2014 images (N = 30000).

    python scripts/coco_prompts.py --captions data/coco/annotations/captions_val2014.json \\
        --out data/mscoco_val2014_30k.txt [--n 30000] [--seed 1234]
    accelerate launch --num_processes 8 sample.py --ckpt mscoco_uvit_small.pth --prompts_file \\
        data/mscoco_val2014_30k.txt --out coco_30k.npz --n_samples 30000

U-ViT's FID-30K (eval_t2i_discrete.py) draws its captions from a shuffled loader over all 40,504 val2014 images
(datasets.py ``MSCOCO256Features``: the images in increasing id order), each item one uniformly random caption of its
image (``random.randint``), 30,000 items: so 30,000 distinct images, one caption each, under seed 1234 (its
config.seed). That draw depends on U-ViT's process and worker count; this command makes the same kind of set as a
file that depends on the seed alone: the first N images of a seeded permutation of the captioned images (ids
sorted), and for each a caption drawn uniformly from its captions (annotation-id order). The first k prompts of a
set are the set of ``--n k`` with the same seed.

OUT gets one prompt per line (whitespace, newlines included, collapsed to single spaces), for ``sample.py
--prompts_file``; OUT with the suffix .json beside it records, line for line, the image id, annotation id and
caption, with the seed and the source file.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any working directory

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.errors import InputError, InputNotFoundError  # noqa: E402
from diffusion.files import write_atomic  # noqa: E402

COMMAND = Command(__doc__, config="none", overrides=False, flags=(
    Flag("captions", required=True, metavar="JSON", help="MS-COCO captions file (annotations/captions_val2014.json)"),
    Flag("out", required=True, metavar="OUT.txt", help="prompts file, one per line; OUT.json beside it"),
    Flag("n", 30_000, int, help="distinct images, one caption each (U-ViT's MS-COCO FID: 30000)"),
    Flag("seed", 1234, int, help="seed of the image permutation and the caption draws (U-ViT's config.seed)"),
))


def read_captions(path: Path) -> tuple[list[int], list[list[tuple[int, str]]]]:
    """(image ids in increasing order, each image's [(annotation id, caption)] in annotation-id order) of the images
    with at least one non-empty caption."""
    if not path.is_file():
        raise InputNotFoundError(f"captions file not found: {path} (MS-COCO's annotations/captions_val2014.json, "
                                 f"from annotations_trainval2014.zip)")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
        image_ids = {int(image["id"]) for image in coco["images"]}
        captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for ann in coco["annotations"]:
            text = " ".join(str(ann["caption"]).split())
            if text and int(ann["image_id"]) in image_ids:
                captions[int(ann["image_id"])].append((int(ann["id"]), text))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path} is not an MS-COCO captions file ({{'images': [{{'id'}}], 'annotations': "
                         f"[{{'image_id', 'id', 'caption'}}]}}): {type(err).__name__}: {err}") from None
    ids = sorted(captions)
    return ids, [sorted(captions[i]) for i in ids]


def prompt_set(ids: list[int], captions: list[list[tuple[int, str]]], n: int, seed: int) -> list[dict]:
    """The first ``n`` images of the seeded permutation, each with one uniformly drawn caption."""
    order = np.random.default_rng([seed, 0]).permutation(len(ids))[:n]
    draws = np.random.default_rng([seed, 1]).random(len(ids))  # one per image, so a set is a prefix of a larger one
    rows = []
    for j in order.tolist():
        annotation_id, caption = captions[j][int(draws[j] * len(captions[j]))]
        rows.append({"image_id": ids[j], "annotation_id": annotation_id, "caption": caption})
    return rows


def run(args: Arguments) -> int:
    source, out = Path(args.captions), Path(args.out)
    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    ids, captions = read_captions(source)
    if len(ids) < args.n:
        raise InputError(f"{source} has {len(ids)} captioned images, fewer than the {args.n} distinct images asked "
                         f"for (U-ViT's MS-COCO set: 30000 of val2014's 40,504): give val2014's captions file or "
                         f"--n {len(ids)}")
    rows = prompt_set(ids, captions, args.n, args.seed)
    record = out.with_suffix(".json")
    if record == out:
        raise InputError(f"--out {out} must not end in .json: the record {record} goes beside it")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write("".join(f"{row['caption']}\n" for row in rows).encode("utf-8")))
    meta = {"source": str(source), "seed": args.seed, "n": args.n, "images_available": len(ids),
            "prompts_file": out.name, "prompts": rows}
    write_atomic(record, lambda f: f.write(json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")))
    print(f"{len(rows)} prompts from {len(rows)} distinct images of {len(ids)} (seed {args.seed}): {out}, {record}")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
