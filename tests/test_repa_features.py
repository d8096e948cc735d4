"""REPA targets cached with the latents (scripts/extract_latents.py --repa_encoders): real image files, the tiny
autoencoder and a tiny randomly initialised DINOv2 saved the way released weights are; a real 2-process resumed
extraction; the cached features against the encoder on the images; training from the cache; and the refusals."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import pil_loader

from diffusion.config.cli import parse_command_line
from diffusion.data.cached import CocoFeatureDataset, LatentDataset, vision_encoder_digest
from diffusion.data.datasets import CocoCaptions, center_crop_arr
from diffusion.data.extraction import extract_coco, extract_imagefolder
from diffusion.errors import ConfigError, JobMismatchError
from diffusion.pretrained.vision_encoders import load_vision_encoders
from diffusion.training.data import stream_batches
from diffusion.training.loop import train
from diffusion.training.repa import RepaTraining
from diffusion.training.run import start_run
from tests.helpers import (
    FILES,
    REPO,
    TINY_MODEL,
    kill_extraction_after_first_shard,
    launch_script,
    make_tiny_autoencoder,
    make_tiny_clip,
    make_tiny_dinov2,
    one_thread,
    stored_shards,
    write_coco,
    write_imagefolder,
)

pytestmark = pytest.mark.filterwarnings("ignore::diffusion.pretrained.vision_encoders.EncoderSizeWarning")

RES = 32  # pixels: 4x4 latents; the encoder sees 28 px, 2x2 tokens: one per latent patch of a patch-2 SiT
KEY = "repa_dinov2-vit-s"
EXTRACT = ["--resolution", str(RES), "--shard_size", "3", "--batch_size", "2", "--num_workers", "0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An ImageFolder (one truncated JPEG) and its one-process extraction with DINOv2 features (the reference)."""
    root = tmp_path_factory.mktemp("repa_cache")
    ae = str(make_tiny_autoencoder(root / "ae"))
    dinov2 = str(make_tiny_dinov2(root / "dinov2_tiny.pth", seed=0))
    data = write_imagefolder(root / "train")
    with one_thread():
        manifest = extract_imagefolder(data, root / "latents", resolution=RES, autoencoder=ae, shard_size=3,
                                       batch_size=2, num_workers=0, repa_encoders="dinov2-vit-s",
                                       repa_encoder_weights=dinov2)
    return dict(root=root, ae=ae, dinov2=dinov2, data=data, out=root / "latents", manifest=manifest,
                paths=[data / wnid / name for wnid, names in FILES.items() for name in names])


def _uint8(path) -> torch.Tensor:
    return torch.from_numpy(center_crop_arr(pil_loader(path), RES)).permute(2, 0, 1)


def test_manifest_records_the_encoder(cache):
    (entry,) = cache["manifest"]["repa_encoders"]
    (encoder,) = load_vision_encoders("dinov2-vit-s", weights=cache["dinov2"], resolution=RES)
    assert entry == {"name": "dinov2-vit-s", "key": KEY, "weights": cache["dinov2"],
                     "sha256": vision_encoder_digest(encoder), "resolution": RES, "input_size": 28, "tokens": 4,
                     "dim": 64, "dtype": "float32"}
    assert json.loads((cache["out"] / "manifest.json").read_text())["repa_encoders"] == [entry]


def test_cached_features_are_the_encoders_of_the_crop_and_its_flip(cache):
    (encoder,) = load_vision_encoders("dinov2-vit-s", weights=cache["dinov2"], resolution=RES)
    stored = stored_shards(cache["out"])
    assert stored[KEY].shape == (6, 2, 4, 64) and stored[KEY].dtype == torch.float32
    for row, index in enumerate(stored["index"].tolist()):
        u = _uint8(cache["paths"][index])
        expected = encoder(torch.stack([u, u.flip(-1)]))
        torch.testing.assert_close(stored[KEY][row], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the flip is another image
    # The dataset hands out the features of the view its latent was drawn from.
    dataset = LatentDataset(cache["out"], random_flip=True)
    views = set()
    for seed in range(12):
        torch.manual_seed(seed)
        item = dataset[4]
        torch.manual_seed(seed)
        view = int(torch.randint(2, ()))  # the dataset's first draw
        views.add(view)
        assert len(item["repa_features"]) == 1
        assert torch.equal(item["repa_features"][0], stored[KEY][4, view])
    assert views == {0, 1}
    assert torch.equal(LatentDataset(cache["out"], random_flip=False)[2]["repa_features"][0], stored[KEY][2, 0])


def test_killed_extraction_with_features_resumes_on_two_processes_with_identical_shards(cache, tmp_path):
    out = tmp_path / "latents"
    args = ["--data", str(cache["data"]), "--out", str(out), "--autoencoder", cache["ae"], *EXTRACT,
            "--repa_encoders", "dinov2-vit-s", "--repa_encoder_weights", cache["dinov2"]]
    blocking, log = cache["paths"][3], tmp_path / "killed.log"  # a named pipe: the run blocks after shard 0
    returncode = kill_extraction_after_first_shard(args, blocking, out, log)
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_000000.json", "shard_000000.safetensors"]
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard_000000.*")}

    resumed = launch_script(2, "scripts/extract_latents.py", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard_000000.*")} == finished
    writers = [json.loads((out / f"shard_00000{k}.json").read_text()) for k in range(3)]
    assert [(w["rank"], w["world"]) for w in writers] == [(0, 1), (1, 2), (0, 2)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == cache["manifest"]["shards"]  # byte for byte (sha256), features included
    assert manifest["repa_encoders"] == cache["manifest"]["repa_encoders"]


def test_coco_cache_stores_the_features_of_every_image(cache, tmp_path):
    coco = write_coco(tmp_path / "coco")
    with one_thread():
        extract_coco(coco, "train", tmp_path / "features", autoencoder=cache["ae"], clip=str(make_tiny_clip(
            tmp_path / "clip")), resolution=RES, shard_size=2, batch_size=2, num_workers=0,
            repa_encoders="dinov2-vit-s", repa_encoder_weights=cache["dinov2"])
    (encoder,) = load_vision_encoders("dinov2-vit-s", weights=cache["dinov2"], resolution=RES)
    dataset, images = CocoFeatureDataset(tmp_path / "features"), CocoCaptions(coco, "train", RES)
    stored = stored_shards(tmp_path / "features")
    assert stored[KEY].shape == (len(dataset), 4, 64)
    for i, index in enumerate(stored["index"].tolist()):
        expected = encoder(torch.from_numpy(images.load_image(index)).permute(2, 0, 1)[None])[0]
        torch.testing.assert_close(dataset[i]["repa_features"][0], expected, atol=1e-5, rtol=1e-5)


def test_features_cannot_be_added_to_a_cache_without_them(cache, tmp_path):
    out = tmp_path / "plain"
    with one_thread():
        extract_imagefolder(cache["data"], out, resolution=RES, autoencoder=cache["ae"], shard_size=3, batch_size=2,
                            num_workers=0)
        with pytest.raises(JobMismatchError, match="without REPA features: they cannot be added"):
            extract_imagefolder(cache["data"], out, resolution=RES, autoencoder=cache["ae"], shard_size=3,
                                batch_size=2, num_workers=0, repa_encoders="dinov2-vit-s",
                                repa_encoder_weights=cache["dinov2"])


def _sit(cache, *overrides, root=None):
    cfg, _ = parse_command_line([
        f"--config={REPO / 'configs' / 'imagenet256_sit_xl2_repa.py'}", *TINY_MODEL["dit"],
        "--config.model.input_size=4", "--config.model.num_classes=2", f"--config.data.root={root or cache['out']}",
        f"--config.data.image_size={RES}", "--config.data.num_workers=0",
        f"--config.autoencoder.pretrained={cache['ae']}",
        f"--config.repa.encoder_weights={cache['dinov2']}", "--config.repa.encoders=dinov2-vit-s",
        "--config.repa.layer=1", "--config.repa.projector_dim=16", "--config.wandb.mode=disabled",
        "--config.eval.metric=", "--config.eval.every=0", "--config.eval.final_n_samples=0",
        "--config.train.batch_size=4", "--config.train.steps=3", "--config.train.log_every=1",
        "--config.train.ckpt_every=3", "--config.train.sample_every=0", "--config.train.mixed_precision=no",
        "--config.sample.per_class=1", "--config.sample.steps=2", "--config.preview.steps=2", *overrides])
    return cfg


def test_training_from_cached_features_uses_them_as_the_targets(cache, tmp_path):
    cfg = _sit(cache)
    (tmp_path / "probe").mkdir()
    run, _ = start_run(cfg, tmp_path / "probe")
    try:
        assert run.repa.cached
        batch = next(stream_batches(run.data.dataset, cfg.seed, 4, 0, run.device))
        cached = run.repa.targets(batch["x"], batch["repa_features"])
        assert cached[0].shape == (4, 4, 64)
        # On the fly from the images (as data.name=imagenet feeds them, in [-1, 1]) the targets are the same.
        dataset = LatentDataset(cache["out"], random_flip=False)
        stored = stored_shards(cache["out"])
        images = torch.stack([_uint8(cache["paths"][i]) for i in stored["index"].tolist()]).float() / 127.5 - 1
        on_the_fly = RepaTraining(run.repa.encoders, run.repa.projectors, run.repa.tap, 0.5, 0, 0.0, None)
        from_images = on_the_fly.targets(images)[0]
        from_cache = torch.stack([dataset[i]["repa_features"][0] for i in range(len(dataset))])
        torch.testing.assert_close(from_cache, from_images, atol=1e-5, rtol=1e-5)
    finally:
        run.repa.tap.remove()
    train(_sit(cache, "--config.train.sample_every=3"), tmp_path / "run")
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "targets cached in data.root" in text
    preview = Image.open(tmp_path / "run" / "samples" / "step_00000003.png")
    assert min(preview.size) > 2 * RES  # decoded images (RES px, two class rows), not the 4x4 latents
    proj = [float(m) for m in re.findall(r" proj (-?[0-9.]+)", text)]
    loss = [float(m) for m in re.findall(r" loss (-?[0-9.]+)", text)]
    assert len(proj) == len(loss) == 3 and all(-1.0 <= p <= 1.0 and p != 0 for p in proj)
    assert all(torch.isfinite(torch.tensor(loss)))


def test_mismatched_or_missing_features_are_refused(cache, tmp_path):
    with pytest.raises(ConfigError, match="holds REPA features of dinov2-vit-s, but repa.encoders='dinov2-vit-b'"):
        train(_sit(cache, "--config.repa.encoders=dinov2-vit-b"), tmp_path / "name")
    other = make_tiny_dinov2(tmp_path / "other.pth", seed=1)
    with pytest.raises(ConfigError, match="come from other weights"):
        train(_sit(cache, f"--config.repa.encoder_weights={other}"), tmp_path / "weights")
    plain = tmp_path / "plain"
    with one_thread():
        extract_imagefolder(cache["data"], plain, resolution=RES, autoencoder=cache["ae"], shard_size=8,
                            batch_size=8, num_workers=0)
    with pytest.raises(ConfigError, match="extracted without REPA features.*--repa_encoders dinov2-vit-s"):
        train(_sit(cache, root=plain), tmp_path / "plain_run")


def test_a_token_mismatch_is_resized_and_said_in_the_log(cache, tmp_path):
    """Patch size 1 gives the backbone 4x4 tokens against the encoder's 2x2: the projected grid is resized (not an
    error) and the log says so."""
    train(_sit(cache, "--config.model.patch_size=1", "--config.train.steps=1", "--config.train.ckpt_every=1"),
          tmp_path)
    text = (tmp_path / "log.txt").read_text()
    assert "the backbone's 16 tokens (4x4) are resized to dinov2-vit-s's 4" in text
    assert all(-1.0 <= float(p) <= 1.0 for p in re.findall(r" proj (-?[0-9.]+)", text))


def test_training_on_the_fly_from_images_decodes_previews(cache, tmp_path):
    """The other source of targets: ImageNet-style images encoded by the VAE at every step (data.name=imagenet),
    the encoder run on the same images; previews are decoded images."""
    import shutil

    images = tmp_path / "imagenet" / "train"  # training on images reads every file: leave the truncated JPEG out
    shutil.copytree(cache["data"], images)
    for bad in images.rglob("*truncated*"):
        bad.unlink()
    train(_sit(cache, "--config.data.name=imagenet", f"--config.data.root={images.parent}",
               "--config.train.sample_every=3"), tmp_path / "run")
    text = (tmp_path / "run" / "log.txt").read_text()
    assert "targets cached" not in text and len(re.findall(r" proj (-?[0-9.]+)", text)) == 3
    preview = Image.open(tmp_path / "run" / "samples" / "step_00000003.png")
    assert min(preview.size) > 2 * RES  # decoded images, not the 4x4 latents
