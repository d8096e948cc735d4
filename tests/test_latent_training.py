"""Latent diffusion end to end: training from cached latents, from images encoded on the fly and from cached
MS-COCO features (tiny real autoencoder and CLIP saved to disk), decoded previews, and sample.py on the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config.cli import parse_command_line
from diffusion.data.extraction import extract_coco, extract_imagefolder
from diffusion.errors import ConfigError
from diffusion.training.data import prepare_data
from diffusion.training.loop import train
from tests.helpers import REPO, TINY_MODEL, make_tiny_autoencoder, make_tiny_clip, write_coco, write_imagefolder

RES = 32  # pixels -> 4x4x4 latents with the tiny autoencoder
COMMON = ["--config.wandb.mode=disabled", "--config.eval.metric=", "--config.eval.every=0",
          "--config.eval.final_n_samples=0",
          "--config.train.batch_size=4",
          "--config.train.steps=4", "--config.train.log_every=2", "--config.train.ckpt_every=4",
          "--config.train.sample_every=2", "--config.data.num_workers=0", "--config.train.mixed_precision=no",
          "--config.sample.per_class=2", "--config.preview.steps=2", "--config.sample.steps=2",
          "--config.optim.warmup_steps=0"]
LATENT_UVIT = [*TINY_MODEL["uvit"], "--config.model.img_size=4", "--config.model.use_checkpoint=False"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    ae, clip = make_tiny_autoencoder(root / "ae"), make_tiny_clip(root / "clip")
    images = write_imagefolder(root / "imagenet" / "train")
    clean = root / "clean" / "train"  # training on images reads every file: leave the truncated JPEG out
    shutil.copytree(images, clean)
    (clean / "n02" / "b_truncated.JPEG").unlink()
    latents = root / "latents"
    extract_imagefolder(images, latents, resolution=RES, autoencoder=str(ae), shard_size=4, batch_size=4,
                        num_workers=0)
    coco = write_coco(root / "coco")
    features = root / "coco_features"
    extract_coco(coco, "train", features, autoencoder=str(ae), clip=str(clip), resolution=RES, shard_size=4,
                 batch_size=4, num_workers=0)
    return dict(ae=str(ae), clip=str(clip), imagenet=clean.parent, latents=latents, features=features)


def _config(config: str, *overrides: str):
    cfg, _ = parse_command_line([f"--config={REPO / 'configs' / config}", *COMMON, *overrides])
    return cfg


def _grid_height(path: Path) -> int:
    return Image.open(path).size[1]


def test_train_from_cached_latents_decodes_previews_and_samples(assets, tmp_path):
    """U-ViT-H/2's recipe (discrete schedule, DPM-Solver++) shrunk: trains on the cache, previews are decoded
    32x32 images (not 4x4 latents), and sample.py writes decoded images from the trainer checkpoint."""
    cfg = _config("imagenet256_uvit_h2.py", *LATENT_UVIT, "--config.model.num_classes=3",
                  "--config.model.null_label=2", f"--config.data.root={assets['latents']}",
                  f"--config.data.image_size={RES}", f"--config.autoencoder.pretrained={assets['ae']}")
    final = train(cfg, tmp_path)
    meta = json.loads((final / "meta.json").read_text())
    assert meta["image_shape"] == [4, 4, 4] and meta["class_counts"] == [3, 3]
    # two class rows of 32x32 images upscaled x2 to 64 px cells with 2 px padding (4x4 latents would give 48 px)
    previews = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in previews] == ["step_00000002.png", "step_00000004.png"]
    assert _grid_height(previews[-1]) == 2 * (64 + 2) + 2
    out = tmp_path / "eval.npz"
    proc = subprocess.run([sys.executable, "sample.py", f"--ckpt={final}", f"--out={out}", "--n_samples=3",
                           "--steps=2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arr = np.load(out)
    assert arr["arr_0"].shape == (3, RES, RES, 3) and arr["arr_0"].dtype == np.uint8
    assert set(arr["arr_1"].tolist()) <= {0, 1}


def test_train_encoding_images_on_the_fly(assets, tmp_path):
    """The original DiT's way: ImageFolder images through the VAE at every step (DiT recipe, learned sigma)."""
    cfg = _config("imagenet256_dit_xl2.py", "--config.model.preset=DiT-S/2", "--config.model.input_size=4",
                  *TINY_MODEL["dit"],
                  "--config.model.num_classes=2", "--config.data.name=imagenet",
                  f"--config.data.root={assets['imagenet']}", f"--config.data.image_size={RES}",
                  f"--config.autoencoder.pretrained={assets['ae']}", "--config.sample.steps=2")
    final = train(cfg, tmp_path)
    meta = json.loads((final / "meta.json").read_text())
    assert meta["image_shape"] == [4, 4, 4]
    assert meta["class_counts"] == [3, 3]  # counted from the ImageFolder's targets
    losses = [float(v) for v in (tmp_path / "log.txt").read_text().split("loss ")[1:] for v in [v.split()[0]]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert _grid_height(sorted((tmp_path / "samples").glob("*.png"))[-1]) == 2 * (64 + 2) + 2


def test_train_text_to_image_from_coco_features(assets, tmp_path):
    """U-ViT's MS-COCO recipe shrunk: cached image moments + CLIP caption tokens, 10% caption dropout to the
    empty caption's encoding; previews are decoded samples for training captions."""
    cfg = _config("mscoco_uvit_s2.py", *LATENT_UVIT, "--config.model.clip_dim=32",
                  f"--config.data.root={assets['features']}", f"--config.data.image_size={RES}",
                  f"--config.autoencoder.pretrained={assets['ae']}",
                  f"--config.text_encoder.pretrained={assets['clip']}")
    final = train(cfg, tmp_path)
    assert json.loads((final / "meta.json").read_text())["image_shape"] == [4, 4, 4]
    preview = sorted((tmp_path / "samples").glob("*.png"))[-1]
    assert _grid_height(preview) == 4 * (64 + 2) + 2  # one row per training caption, decoded 32x32 cells


def test_caption_dropout_uses_the_null_context():
    from diffusion.training.pieces import drop_contexts

    context, null = torch.randn(2000, 3, 5), torch.randn(3, 5)
    out = drop_contexts(context, 0.1, null)
    dropped = (out == null).all(-1).all(-1)
    kept = (out == context).all(-1).all(-1)
    assert (dropped | kept).all() and 0.07 < dropped.float().mean() < 0.13


def test_latent_config_refuses_a_cache_from_another_autoencoder(assets, tmp_path):
    other = make_tiny_autoencoder(tmp_path / "other_ae", seed=1)
    cfg = _config("imagenet256_uvit_l2.py", *LATENT_UVIT, "--config.model.num_classes=3", "--config.model.null_label=2",
                  f"--config.data.root={assets['latents']}", f"--config.data.image_size={RES}",
                  f"--config.autoencoder.pretrained={other}")
    with pytest.raises(ConfigError, match="whose encoder weights differ from those of the config's"):
        train(cfg, tmp_path / "run")
    cfg = _config("imagenet256_uvit_l2.py", *LATENT_UVIT, f"--config.data.root={assets['latents']}",
                  f"--config.autoencoder.pretrained={assets['ae']}")  # image_size 256 != the cache's 32
    with pytest.raises(ConfigError, match="256"):
        train(cfg, tmp_path / "run2")
    cfg = _config("imagenet256_uvit_l2.py", f"--config.data.root={assets['latents']}",
                  "--config.autoencoder.pretrained=")
    with pytest.raises(ConfigError, match="autoencoder.pretrained"):
        train(cfg, tmp_path / "run3")


def test_a_cache_serves_a_config_naming_another_file_with_the_same_encoder(assets, tmp_path):
    """U-ViT encodes every ImageNet latent with autoencoder_kl.pth, and some configs decode with the EMA file, whose
    encoder is the same: the run's data accepts the cache (compared by the encoder's weights, not the name)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets["ae"])
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.01)
    vae.save_pretrained(tmp_path / "ema_ae")
    cfg = _config("imagenet256_uvit_l2.py", *LATENT_UVIT, "--config.model.num_classes=3", "--config.model.null_label=2",
                  f"--config.data.root={assets['latents']}", f"--config.data.image_size={RES}",
                  f"--config.autoencoder.pretrained={tmp_path / 'ema_ae'}")
    data = prepare_data(cfg, torch.device("cpu"))
    assert len(data.dataset) == 6 and data.shape == (4, 4, 4) and data.decode is not None


@pytest.mark.parametrize("what", ["autoencoder", "inception"])
def test_missing_pretrained_weights_are_one_clear_error(tmp_path, what):
    """Weights that cannot be downloaded here: train.py says which file and how to get it (exit 2, no traceback)."""
    if what == "autoencoder":
        args = ["--config=configs/imagenet256_dit_xl2.py", "--config.data.name=imagenet",
                f"--config.data.root={tmp_path}", f"--config.autoencoder.pretrained={tmp_path / 'vae.pth'}"]
    else:
        args = ["--config=configs/digits_uvit.py", "--config.eval.feature_extractor=inception", "--config.eval.every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch_home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "train.py", *args, "--config.wandb.mode=disabled",
                           f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    expected = "vae.pth" if what == "autoencoder" else "pt_inception-2015-12-05"
    assert expected in proc.stderr and "error:" in proc.stderr


def test_in_training_fid_of_a_text_model_reads_eval_captions(assets, tmp_path):
    """eval.captions: the FID samples of a text-to-image run are conditioned on another cached split's captions
    (U-ViT's val2014), sample i on image i's caption chosen by (seed, i); without it, the training set's first
    1,000. The trainer's FID scorer is handed them."""
    from accelerate import PartialState

    from diffusion.training.data import fid_captions
    from diffusion.training.run import start_fid

    val = write_coco(tmp_path / "coco_val", "val")
    path = val / "annotations" / "captions_val2014.json"
    record = json.loads(path.read_text())
    for a in record["annotations"]:
        a["caption"] = f"a held-out caption {a['id']}"
    path.write_text(json.dumps(record))
    features = tmp_path / "val_features"
    extract_coco(val, "val", features, autoencoder=assets["ae"], clip=assets["clip"], resolution=RES, shard_size=4,
                 batch_size=4, num_workers=0)
    overrides = [*LATENT_UVIT, "--config.model.clip_dim=32", f"--config.data.root={assets['features']}",
                 f"--config.data.image_size={RES}", f"--config.autoencoder.pretrained={assets['ae']}",
                 f"--config.text_encoder.pretrained={assets['clip']}"]
    cfg = _config("mscoco_uvit_s2.py", *overrides, f"--config.eval.captions={features}")
    data = prepare_data(cfg, torch.device("cpu"))
    held_out = fid_captions(cfg, data)
    training = fid_captions(_config("mscoco_uvit_s2.py", *overrides, "--config.eval.captions="), data)
    assert len(training) == len(data.dataset) and len(held_out) == len(held_out.dataset) != 0
    first = held_out[torch.tensor([0, 1])]
    assert torch.equal(first, held_out[torch.tensor([0, 1])])  # fixed by (seed, i)
    assert not torch.equal(first, training[torch.tensor([0, 1])])  # other captions
    reference = tmp_path / "reference.npz"  # statistics of the digits features (64-d)
    np.savez(reference, mu=np.zeros(64), sigma=np.eye(64))
    scorer, _ = start_fid(_config("mscoco_uvit_s2.py", *overrides, f"--config.eval.captions={features}",
                                  "--config.eval.every=4", "--config.eval.feature_extractor=digits",
                                  f"--config.eval.reference={reference}"),
                          tmp_path, PartialState(cpu=True), data, None)
    assert torch.equal(scorer.captions[torch.tensor([0, 1])], first)  # what the trainer's FID samples are drawn on
