"""scripts/coco_prompts.py: U-ViT's MS-COCO prompt set (one random caption for each of 30,000 distinct val2014
images), seeded, as a prompts file for sample.py --prompts_file plus a JSON record of (image id, caption)."""

import json
import runpy
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "coco_prompts.py"
IMAGES = 31_000


def captions_json(path, n_images: int, uncaptioned: tuple[int, ...] = ()) -> dict[int, list[str]]:
    """A captions_val2014.json in the official layout: ``n_images`` images with sparse ids, 5-7 captions each (none
    for the image ids in ``uncaptioned``), annotations shuffled; returns {image id: its captions}."""
    rng = np.random.default_rng(7)
    ids = np.sort(rng.choice(600_000, size=n_images, replace=False)) + 1
    images, annotations, truth, ann_id = [], [], {}, 0
    for k, image_id in enumerate(ids.tolist()):
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg", "height": 480,
                       "width": 640})
        if image_id in uncaptioned:
            continue
        texts = [f"photo {image_id} caption {j}" for j in range(5 + k % 3)]
        if k == 3:
            texts[0] = "  A man\nriding a   horse. "  # whitespace and a newline inside a caption
        truth[image_id] = [" ".join(t.split()) for t in texts]
        for text in texts:
            ann_id += int(rng.integers(1, 9))
            annotations.append({"image_id": image_id, "id": ann_id, "caption": text})
    order = rng.permutation(len(annotations))
    path.write_text(json.dumps({"info": {}, "images": images, "licenses": [],
                                "annotations": [annotations[i] for i in order]}))
    return truth


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    truth = captions_json(root / "captions_val2014.json", IMAGES)
    return root / "captions_val2014.json", truth


def write_set(captions, out, *flags) -> tuple[list[str], dict]:
    main = runpy.run_path(str(SCRIPT), run_name="not_main")["main"]
    assert main([f"--captions={captions}", f"--out={out}", *flags]) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # one prompt per line, newline-terminated
    return lines[:-1], json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))


def test_thirty_thousand_distinct_images_one_of_their_captions_each(coco, tmp_path):
    captions, truth = coco
    lines, record = write_set(captions, tmp_path / "prompts.txt")
    rows = record["prompts"]
    assert len(lines) == len(rows) == 30_000 and record["n"] == 30_000 and record["seed"] == 1234
    assert record["images_available"] == IMAGES
    ids = [row["image_id"] for row in rows]
    assert len(set(ids)) == 30_000 and set(ids) <= set(truth)  # distinct images of the file
    assert [row["caption"] for row in rows] == lines  # the record is the prompts file, line for line
    assert all(row["caption"] in truth[row["image_id"]] for row in rows)  # each image's own caption
    assert all(line == " ".join(line.split()) and line for line in lines)  # sample.py reads them back unchanged
    # A uniform draw among each image's 5-7 captions: every position is used, none dominates.
    positions = Counter(truth[row["image_id"]].index(row["caption"]) for row in rows)
    assert set(positions) == set(range(7))
    assert 0.16 < positions[0] / len(rows) < 0.18  # E = (1/5 + 1/6 + 1/7) / 3 = 0.170 over images of 5, 6, 7
    assert ids != sorted(ids)  # shuffled, as U-ViT's loader hands them out


def test_same_seed_same_file_other_seed_other_set(coco, tmp_path):
    captions, _ = coco
    first, _ = write_set(captions, tmp_path / "a.txt")
    again, _ = write_set(captions, tmp_path / "b.txt", "--seed=1234")
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes() and first == again
    assert (tmp_path / "a.json").read_text().replace("a.txt", "b.txt") == (tmp_path / "b.json").read_text()
    other, record = write_set(captions, tmp_path / "c.txt", "--seed=1")
    assert record["seed"] == 1 and other != first
    ids = {row["image_id"] for row in json.loads((tmp_path / "a.json").read_text())["prompts"]}
    assert ids != {row["image_id"] for row in record["prompts"]}
    small, _ = write_set(captions, tmp_path / "d.txt", "--n=1000")
    assert small == first[:1000]  # a smaller set is the start of the larger one


def test_too_few_images_is_a_clear_error(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT), run_name="not_main")["main"]
    captions_json(tmp_path / "captions.json", 30_000, uncaptioned=())
    assert main([f"--captions={tmp_path / 'captions.json'}", f"--out={tmp_path / 'ok.txt'}"]) == 0
    capsys.readouterr()
    # 30,000 images, one without a caption: 29,999 usable, fewer than asked for
    ids = [image["id"] for image in json.loads((tmp_path / "captions.json").read_text())["images"]]
    captions_json(tmp_path / "short.json", 30_000, uncaptioned=(ids[5],))
    assert main([f"--captions={tmp_path / 'short.json'}", f"--out={tmp_path / 'p.txt'}"]) == 2
    err = capsys.readouterr().err
    assert "29999 captioned images, fewer than the 30000" in err and "--n 29999" in err
    assert not (tmp_path / "p.txt").exists() and not (tmp_path / "p.json").exists()
    assert main([f"--captions={tmp_path / 'short.json'}", f"--out={tmp_path / 'p.txt'}", "--n=29999"]) == 0
    assert len((tmp_path / "p.txt").read_text().splitlines()) == 29_999


def test_missing_or_malformed_captions_file(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT), run_name="not_main")["main"]
    assert main([f"--captions={tmp_path / 'nope.json'}", f"--out={tmp_path / 'p.txt'}"]) == 2
    assert "captions file not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 1}]}))
    assert main([f"--captions={tmp_path / 'bad.json'}", f"--out={tmp_path / 'p.txt'}"]) == 2
    assert "is not an MS-COCO captions file" in capsys.readouterr().err
    (tmp_path / "ok.json").write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 2, "caption": "a cat"}]}))
    assert main([f"--captions={tmp_path / 'ok.json'}", f"--out={tmp_path / 'p.json'}", "--n=1"]) == 2
    assert "must not end in .json" in capsys.readouterr().err


def test_runs_as_a_file_and_feeds_sample_py(tmp_path):
    """The command line as documented, and sample.py's reader takes the file back line for line."""
    from diffusion.config.cli import parse_arguments

    captions = tmp_path / "captions_val2014.json"
    truth = captions_json(captions, 40)
    out = tmp_path / "sub" / "prompts.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--captions", str(captions), "--out", str(out), "--n", "12",
                           "--seed", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "12 prompts from 12 distinct images" in proc.stdout
    sample = runpy.run_path(str(REPO / "sample.py"), run_name="not_main")
    args = parse_arguments(["--ckpt=x", f"--prompts_file={out}"], sample["COMMAND"])
    prompts = sample["read_prompts"](args)
    record = json.loads(out.with_suffix(".json").read_text())
    assert prompts == [row["caption"] for row in record["prompts"]] and len(prompts) == 12
    assert all(row["caption"] in truth[row["image_id"]] for row in record["prompts"])
