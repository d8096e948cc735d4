"""Cached-feature extraction and datasets: real image files and COCO annotations on disk, the tiny autoencoder and
CLIP saved the way released weights are, and real multi-process launches."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import runpy
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from safetensors.torch import load_file
from torchvision.datasets.folder import pil_loader

from diffusion.data.cached import CocoFeatureDataset, LatentDataset, load_captions
from diffusion.data.datasets import CocoCaptions, build_dataset, center_crop_arr
from diffusion.data.extraction import ImageFolderImages, ImageFolderLatents, extract_imagefolder, run_extraction
from diffusion.errors import ConfigError, DatasetNotFoundError
from diffusion.pretrained.autoencoder import Autoencoder
from diffusion.pretrained.text_encoder import TextEncoder
from tests.helpers import (
    COCO_IMAGES,
    FILES,
    GREEN,
    REPO,
    kill_extraction_after_first_shard,
    launch_script,
    make_tiny_autoencoder,
    make_tiny_clip,
    one_thread,
    stored_shards,
    write_coco,
    write_imagefolder,
    write_ldm_single_file,
)

RES = 16  # pixels; the tiny autoencoder downsamples by 8 -> 2x2 latents
SCALE = 0.18215


def _pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("models")
    return SimpleNamespace(ae=str(make_tiny_autoencoder(root / "ae")), clip=str(make_tiny_clip(root / "clip")))


# ----------------------------------------------------------------------------------------------------------------------
# ImageFolder extraction

# Sorted as ImageFolder sorts them: indices 0-2 are class 0, 3-6 class 1; index 4 is a truncated JPEG.
EXTRACT = ["--resolution", str(RES), "--shard_size", "3", "--batch_size", "2", "--num_workers", "0"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory, models) -> SimpleNamespace:
    """A small ImageFolder and its extraction by one in-process run (the reference for the other tests)."""
    root = tmp_path_factory.mktemp("imagenet")
    data = write_imagefolder(root / "train")
    with one_thread():
        manifest = extract_imagefolder(data, root / "latents", resolution=RES, autoencoder=models.ae,
                                       shard_size=3, batch_size=2, num_workers=0)
    return SimpleNamespace(data=data, out=root / "latents", manifest=manifest,
                           corrupt=data / "n02" / "b_truncated.JPEG",
                           paths=[data / wnid / name for wnid, names in FILES.items() for name in names])


def test_extraction_counts_labels_and_skips_the_corrupt_file(imagenet, models) -> None:
    m = imagenet.manifest
    assert m == json.loads((imagenet.out / "manifest.json").read_text())
    assert m["counts"] == {"images": 6, "skipped": 1, "per_class": [3, 3]}
    assert [(s["index"], s["path"]) for s in m["skipped"]] == [(4, str(imagenet.corrupt))]
    assert "truncated" in m["skipped"][0]["error"]
    assert (m["kind"], m["classes"], m["flip"], m["resolution"], m["autoencoder"], m["scale_factor"]) == \
        ("imagefolder", ["n01", "n02"], True, RES, models.ae, SCALE)
    assert (m["latent_shape"], m["dtype"], m["num_source_images"]) == ([4, 2, 2], "float32", 7)
    # Shard k covers source items [3k, 3k + 3); the corrupt item leaves shard 1 with two images.
    assert [(s["file"], s["start"], s["stop"], s["count"]) for s in m["shards"]] == [
        ("shard_000000.safetensors", 0, 3, 3), ("shard_000001.safetensors", 3, 6, 2),
        ("shard_000002.safetensors", 6, 7, 1)]
    for shard in m["shards"]:
        assert hashlib.sha256((imagenet.out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    stored = stored_shards(imagenet.out)
    assert stored["index"].tolist() == [0, 1, 2, 3, 5, 6]  # every readable image exactly once
    assert stored["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert stored["moments"].shape == (6, 2, 8, 2, 2) and stored["moments"].dtype == torch.float32


def test_stored_moments_are_the_encoders_of_the_crop_and_its_flip(imagenet, models) -> None:
    ae = Autoencoder.load(models.ae, scale_factor=SCALE)
    stored = stored_shards(imagenet.out)
    for row, index in enumerate(stored["index"].tolist()):
        x = _pixels(center_crop_arr(pil_loader(imagenet.paths[index]), RES))
        expected = ae.encode_moments(torch.stack([x, x.flip(-1)]))
        torch.testing.assert_close(stored["moments"][row], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the flip is a different image


def test_killed_extraction_resumes_on_two_processes_with_identical_shards(imagenet, models, tmp_path) -> None:
    out = tmp_path / "latents"
    args = ["--data", str(imagenet.data), "--out", str(out), "--autoencoder", models.ae, *EXTRACT]
    # For the first run image 3, the first of shard 1, is a named pipe: reading it blocks, so the run holds still
    # right after writing shard 0, and is killed there.
    blocking, log = imagenet.paths[3], tmp_path / "killed.log"
    returncode = kill_extraction_after_first_shard(args, blocking, out, log)
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_000000.json", "shard_000000.safetensors"]
    assert not (out / "manifest.json").exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard_000000.*")}
    stale = out / ".shard_000001.safetensors.tmp4242"  # what a kill in the middle of writing a shard leaves
    stale.write_bytes(b"half a shard")

    resumed = launch_script(2, "scripts/extract_latents.py", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard_000000.*")} == finished
    assert not stale.exists()
    writers = [json.loads((out / f"shard_00000{k}.json").read_text()) for k in range(3)]
    assert [(w["rank"], w["world"]) for w in writers] == [(0, 1), (1, 2), (0, 2)]  # shard k by rank k mod world
    manifest = json.loads((out / "manifest.json").read_text())
    # 1 process, then 2 processes: the same files, byte for byte, as one uninterrupted single-process run.
    assert manifest["shards"] == imagenet.manifest["shards"]
    assert manifest["counts"] == imagenet.manifest["counts"] and manifest["skipped"] == imagenet.manifest["skipped"]
    assert stored_shards(out)["index"].tolist() == [0, 1, 2, 3, 5, 6]


def test_on_corrupt_error_names_the_file(imagenet, models, tmp_path, capsys) -> None:
    main = runpy.run_path(str(REPO / "scripts" / "extract_latents.py"))["main"]
    args = ["--data", str(imagenet.data), "--out", str(tmp_path / "out"), "--autoencoder", models.ae, *EXTRACT]
    with one_thread():
        assert main([*args, "--on_corrupt", "error"]) == 2
    err = capsys.readouterr().err
    assert str(imagenet.corrupt) in err and "--on_corrupt skip" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rerun_resumes_nothing_to_do_and_refuses_other_settings(imagenet, models) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in imagenet.out.glob("shard_*")}
    with one_thread():
        assert extract_imagefolder(imagenet.data, imagenet.out, resolution=RES, autoencoder=models.ae,
                                   shard_size=3, batch_size=2, num_workers=0) == imagenet.manifest
        assert {p.name: p.stat().st_mtime_ns for p in imagenet.out.glob("shard_*")} == before
        with pytest.raises(ValueError, match=r"resolution: 16 there, 32 now.*another --out"):
            extract_imagefolder(imagenet.data, imagenet.out, resolution=32, autoencoder=models.ae, shard_size=3)


# ----------------------------------------------------------------------------------------------------------------------
# LatentDataset


def test_latent_dataset_draws_fresh_posterior_samples(imagenet, models) -> None:
    ds = LatentDataset(imagenet.out, expect_autoencoder=models.ae, expect_resolution=RES, random_flip=False)
    assert len(ds) == 6 and ds.classes == ["n01", "n02"] and ds.class_counts == [3, 3]
    item = ds[4]
    assert item["x"].dtype == torch.float32 and item["x"].shape == (4, 2, 2)
    assert item["y"].dtype == torch.int64 and item["y"].item() == 1
    assert not torch.equal(ds[0]["x"], ds[0]["x"])

    mean, logvar = stored_shards(imagenet.out)["moments"][0, 0].chunk(2)
    std = torch.exp(0.5 * logvar)
    n = 4000
    torch.manual_seed(0)
    samples = torch.stack([ds[0]["x"] for _ in range(n)])
    assert ((samples.mean(0) - SCALE * mean).abs() < 5 * SCALE * std / math.sqrt(n)).all()
    torch.testing.assert_close(samples.std(0), SCALE * std, rtol=0.1, atol=0)

    # The scale factor multiplies the whole sample: same noise, another scale.
    rescaled = LatentDataset(imagenet.out, scale_factor=0.5, random_flip=False)
    torch.manual_seed(1)
    a = ds[2]["x"]
    torch.manual_seed(1)
    torch.testing.assert_close(rescaled[2]["x"], a * 0.5 / SCALE)


class _KnownMoments(ImageFolderLatents):
    """Mean +(index + 1) for the original, -(index + 1) for the flip, std 0.01: which view a sample came from, and
    with what scale, can be read off it."""

    def encode(self, items):
        index = torch.tensor([item["index"] for item in items], dtype=torch.int64)
        mean = (index + 1.0)[:, None, None, None].expand(-1, 4, 2, 2)
        logvar = torch.full_like(mean, 2 * math.log(0.01))
        original, flipped = torch.cat([mean, logvar], 1), torch.cat([-mean, logvar], 1)
        return {"moments": torch.stack([original, flipped], 1), "label": torch.tensor([i["label"] for i in items]),
                "index": index}


def test_latent_dataset_picks_flips_and_scales(imagenet, tmp_path) -> None:
    source = ImageFolderImages(imagenet.data, RES)
    settings = {"kind": "imagefolder", "classes": source.classes, "autoencoder": "known", "scale_factor": 0.5,
                "resolution": RES, "latent_shape": [4, 2, 2], "dtype": "float16", "flip": True}
    manifest = run_extraction(_KnownMoments(source, None, settings), tmp_path, shard_size=4, batch_size=3,
                              num_workers=0)
    assert manifest["counts"]["images"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    assert load_file(tmp_path / "shard_000000.safetensors")["moments"].dtype == torch.float16

    flipping, fixed = LatentDataset(tmp_path), LatentDataset(tmp_path, random_flip=False)  # manifest's scale 0.5
    torch.manual_seed(0)
    for position, index in enumerate([0, 1, 2, 3, 5, 6]):
        views = set()
        for _ in range(40):
            x = flipping[position]["x"]
            assert x.dtype == torch.float32
            sign = 1.0 if x.mean() > 0 else -1.0
            assert (x - sign * 0.5 * (index + 1)).abs().max() < 0.5 * 0.05
            views.add(sign)
            assert (fixed[position]["x"] - 0.5 * (index + 1)).abs().max() < 0.5 * 0.05
        assert views == {1.0, -1.0}


def test_latent_dataset_refuses_a_mismatched_manifest(imagenet, models) -> None:
    with pytest.raises(ConfigError) as info:
        LatentDataset(imagenet.out, expect_autoencoder="stabilityai/sd-vae-ft-mse")
    message = str(info.value)
    assert models.ae in message and "stabilityai/sd-vae-ft-mse" in message
    assert "--autoencoder stabilityai/sd-vae-ft-mse" in message and f"autoencoder.pretrained={models.ae}" in message
    with pytest.raises(ConfigError, match=r"resolution 16.*data.image_size=512.*--resolution 512"):
        LatentDataset(imagenet.out, expect_resolution=512)
    with pytest.raises(ConfigError, match="holds imagefolder features.*data.name=latents"):
        CocoFeatureDataset(imagenet.out)


def _other_decoder(folder: str, out: Path) -> Path:
    """The tiny autoencoder of ``folder`` with a fine-tuned decoder (U-ViT's autoencoder_kl_ema.pth beside
    autoencoder_kl.pth), saved to ``out``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.01)
    vae.save_pretrained(out)
    return out


def test_the_cache_is_checked_by_the_encoders_weights(imagenet, models, tmp_path) -> None:
    """A cache serves a config naming another file (another format, another decoder) with the same encoder; another
    encoder is refused naming both; a manifest from before the digest falls back to comparing names."""
    data = ConfigDict(dict(name="latents", root=str(imagenet.out), image_size=RES, random_flip=True))
    original = Autoencoder.load(models.ae, scale_factor=SCALE)
    assert imagenet.manifest["encoder_sha256"] == original.encoder_digest()
    ema = write_ldm_single_file(_other_decoder(models.ae, tmp_path / "ema"), tmp_path / "autoencoder_kl_ema.pth")
    ema_cfg = ConfigDict(dict(pretrained=str(ema), single_file_config=models.ae, scale_factor=SCALE))
    loaded = Autoencoder.from_config(ema_cfg)
    assert not torch.equal(loaded.decode(torch.ones(1, 4, 2, 2)), original.decode(torch.ones(1, 4, 2, 2)))
    assert len(build_dataset(data, autoencoder_cfg=ema_cfg)) == 6  # loads the config's autoencoder to compare
    assert len(build_dataset(data, autoencoder_cfg=ema_cfg, autoencoder=loaded)) == 6  # or takes the loaded one
    other = make_tiny_autoencoder(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError) as info:
        build_dataset(data, autoencoder_cfg=ConfigDict(dict(pretrained=str(other), scale_factor=SCALE)))
    message = str(info.value)
    assert f"extracted with autoencoder {models.ae!r}, whose encoder weights differ" in message
    assert f"--autoencoder {other}" in message and f"--config.autoencoder.pretrained={models.ae}" in message
    old = tmp_path / "old_cache"  # written before manifests recorded the digest
    shutil.copytree(imagenet.out, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["encoder_sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    old_data = ConfigDict({**data.to_dict(), "root": str(old)})
    with pytest.raises(ConfigError, match=f"extracted with autoencoder {models.ae!r}, but the config says"):
        build_dataset(old_data, autoencoder_cfg=ema_cfg)
    assert len(build_dataset(old_data, autoencoder_cfg=ConfigDict(dict(pretrained=models.ae,
                                                                       scale_factor=SCALE)))) == 6


def test_build_dataset_checks_the_config(imagenet, models, tmp_path) -> None:
    data = ConfigDict(dict(name="latents", root=str(imagenet.out), image_size=RES, random_flip=True))
    ae_cfg = ConfigDict(dict(pretrained=models.ae, scale_factor=0.3))
    ds = build_dataset(data, autoencoder_cfg=ae_cfg)
    assert isinstance(ds, LatentDataset) and ds.random_flip and ds.scale_factor == 0.3 and len(ds) == 6
    assert not build_dataset(data, train=False, autoencoder_cfg=ae_cfg).random_flip
    with pytest.raises(ConfigError, match="autoencoder.pretrained is empty"):
        build_dataset(data, autoencoder_cfg=ConfigDict(dict(pretrained="", scale_factor=SCALE)))
    with pytest.raises(ConfigError, match="data.image_size=256"):
        build_dataset(ConfigDict({**data.to_dict(), "image_size": 256}), autoencoder_cfg=ae_cfg)
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path / 'manifest.json'}.*extract_latents.py"):
        build_dataset(ConfigDict({**data.to_dict(), "root": str(tmp_path)}))
    (tmp_path / "extraction.json").write_text("{}")
    with pytest.raises(DatasetNotFoundError, match="unfinished extraction: rerun its command"):
        build_dataset(ConfigDict({**data.to_dict(), "root": str(tmp_path)}))


def test_latent_dataset_checks_shard_files(imagenet, tmp_path) -> None:
    out = shutil.copytree(imagenet.out, tmp_path / "copy")
    shard = out / "shard_000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other contents
    shard.write_bytes(bytes(data))
    LatentDataset(out)  # sizes only by default
    with pytest.raises(ValueError, match=f"{shard} fails its sha256 check"):
        LatentDataset(out, verify_checksums=True)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=f"{shard} is missing or has the wrong size"):
        LatentDataset(out)


def test_latent_dataset_pickles_for_dataloader_workers(imagenet) -> None:
    ds = LatentDataset(imagenet.out)
    ds[5]  # opens a shard
    copy = pickle.loads(pickle.dumps(ds))
    assert copy[5]["y"].item() == 1 and copy[5]["x"].shape == (4, 2, 2)


# ----------------------------------------------------------------------------------------------------------------------
# MS-COCO

def _expected_captions(image_id: int) -> list[str]:
    count = dict((i, n) for i, _, n in COCO_IMAGES)[image_id]
    return [f"the cat {image_id} and dog {j}" for j in range(count)]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return write_coco(tmp_path_factory.mktemp("coco"))


def test_coco_captions_dataset(coco_root) -> None:
    ds = CocoCaptions(coco_root, "train", image_size=RES)
    assert ds.image_ids == [3, 7, 9, 25]
    assert ds.captions == [_expected_captions(i) for i in ds.image_ids]  # annotation-id order
    for index in range(len(ds)):
        item = ds[index]
        assert item["captions"] == ds.captions[index]
        x = item["x"]
        assert x.dtype == torch.float32 and x.shape == (3, RES, RES)
        # Only the centre square is kept: no RED margin survives the crop.
        green = torch.tensor(GREEN, dtype=torch.float32)[:, None, None] / 127.5 - 1
        assert (x - green).abs().max() < 6 / 127.5


def test_coco_missing_files(coco_root, tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(coco_root / "val2014")):
        CocoCaptions(coco_root, "val")
    shutil.copytree(coco_root / "train2014", tmp_path / "train2014")
    with pytest.raises(DatasetNotFoundError) as info:
        CocoCaptions(tmp_path, "train")
    assert str(tmp_path / "annotations" / "captions_train2014.json") in str(info.value)
    assert str(tmp_path / "train2014") not in str(info.value).split("missing")[0]
    with pytest.raises(ValueError, match="train, val"):
        CocoCaptions(coco_root, "test")


def test_coco_extraction_on_two_processes(coco_root, models, tmp_path) -> None:
    out = tmp_path / "features"
    proc = launch_script(2, "scripts/extract_coco.py", [
        "--root", str(coco_root), "--split", "train", "--out", str(out), "--autoencoder", models.ae,
        "--clip", models.clip, "--resolution", str(RES), "--shard_size", "2", "--batch_size", "1",
        "--num_workers", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"images": 4, "skipped": 0, "captions": 6 + 5 + 5 + 7}
    assert (manifest["kind"], manifest["split"], manifest["text_encoder"], manifest["max_length"]) == \
        ("coco", "train", models.clip, 77)
    assert (manifest["context_shape"], manifest["flip"], manifest["scale_factor"]) == ([77, 32], False, 0.2301)

    coco = CocoCaptions(coco_root, "train", image_size=RES)
    assert load_captions(out) == [
        {"index": i, "image_id": coco.image_ids[i], "file_name": coco.file_names[i], "captions": coco.captions[i]}
        for i in range(4)]
    stored = stored_shards(out)
    assert stored["index"].tolist() == [0, 1, 2, 3] and stored["image_id"].tolist() == coco.image_ids
    assert stored["num_captions"].tolist() == [len(c) for c in coco.captions]

    ae = Autoencoder.load(models.ae, scale_factor=SCALE)
    te = TextEncoder.load(models.clip)
    images = torch.stack([_pixels(coco.load_image(i)) for i in range(4)])
    torch.testing.assert_close(stored["moments"], ae.encode_moments(images), atol=1e-5, rtol=1e-5)
    encodings = [te.encode(captions) for captions in coco.captions]
    torch.testing.assert_close(stored["context"], torch.cat(encodings), atol=1e-5, rtol=1e-5)

    ds = CocoFeatureDataset(out, expect_autoencoder=models.ae, expect_resolution=RES, expect_text_encoder=models.clip)
    assert len(ds) == 4
    assert ds.null_context.dtype == torch.float32 and ds.null_context.shape == (77, 32)
    torch.testing.assert_close(ds.null_context, te.encode([""])[0], atol=1e-6, rtol=1e-6)
    torch.manual_seed(0)
    for index, expected in enumerate(encodings):
        drawn = set()
        for _ in range(100):
            item = ds[index]
            assert item["x"].shape == (4, 2, 2) and item["context"].dtype == torch.float32
            distances = (expected - item["context"]).flatten(1).abs().amax(1)
            assert distances.min() < 1e-5  # the encoding of one of this image's captions
            drawn.add(int(distances.argmin()))
        assert drawn == set(range(len(expected)))  # every caption gets drawn
    assert not torch.equal(ds[0]["x"], ds[0]["x"])

    data = ConfigDict(dict(name="coco_latents", root=str(out), image_size=RES, random_flip=False))
    ae_cfg = ConfigDict(dict(pretrained=models.ae, scale_factor=0.2301))
    assert isinstance(build_dataset(data, autoencoder_cfg=ae_cfg), CocoFeatureDataset)
    with pytest.raises(ConfigError, match=r"text_encoder.pretrained='openai/clip-vit-large-patch14'.*--clip openai"):
        build_dataset(data, autoencoder_cfg=ae_cfg,
                      text_encoder_cfg=ConfigDict(dict(pretrained="openai/clip-vit-large-patch14")))
