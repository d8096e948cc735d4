"""A latent-training workload end to end for the benchmark: cached latents against encoding the images with an
SD-architecture VAE at every step, on a small ImageFolder written once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.data.extraction import extract_imagefolder

# The Stable Diffusion KL-f8 autoencoder (stabilityai/sd-vae-ft-ema's config.json): randomly initialised it costs the
# same time as the trained one.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256)


def prepare_latent_fixture(folder: str, resolution: int = 256, images: int = 16, progress=print) -> dict:
    """``folder``/imagenet/train (an ImageFolder of JPEGs, 2 classes), ``folder``/sd-vae (a random SD-architecture
    AutoencoderKL saved with save_pretrained) and ``folder``/latents (their moments, extracted by
    :func:`~diffusion.data.extraction.extract_imagefolder`). Reused when already there. Returns the config overrides
    of the two data paths: ``cached`` and ``vae`` (on-the-fly encoding, the original DiT's way)."""
    root = Path(folder)
    train = root / "imagenet" / "train"
    vae = root / "sd-vae"
    latents = root / "latents"
    if not (train / "done").exists():
        rng = np.random.default_rng(0)
        for i in range(images):
            (train / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
            smooth = rng.random((resolution // 16, resolution // 16, 3)) * 255
            image = Image.fromarray(smooth.astype(np.uint8)).resize((resolution + 32, resolution), Image.BICUBIC)
            image.save(train / f"class_{i % 2}" / f"{i:05d}.JPEG", quality=90)
        (train / "done").touch()
    if not (vae / "config.json").exists():
        from diffusers import AutoencoderKL  # slow to import: only when the VAE is written

        torch.manual_seed(0)
        AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(vae)
    if not (latents / "manifest.json").exists():
        progress(f"[benchmark] extracting the latents of {images} images with the SD VAE (once)")
        extract_imagefolder(train, latents, resolution=resolution, autoencoder=str(vae), batch_size=8, num_workers=0)
    common = {"autoencoder.pretrained": str(vae), "data.image_size": str(resolution), "data.num_workers": "0",
              "data.verify_checksums": "false"}
    return {"cached": {**common, "data.name": "latents", "data.root": str(latents)},
            "vae": {**common, "data.name": "imagenet", "data.root": str(root / "imagenet")}}
