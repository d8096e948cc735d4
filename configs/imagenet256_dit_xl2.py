"""ImageNet 256x256 (32x32x4 SD-VAE latents), DiT-XL/2 with DiT's recipe in full (Peebles & Xie 2023): AdamW 1e-4
constant, no weight decay, batch 256, 7M steps (1400 epochs), EMA 0.9999, fp32 with TF32 matmuls, checkpoint every
50K, log every 100, 10% label dropout. Sampling defaults are those behind FID 2.27: 250-step ancestral DDPM, guidance
1.5 on the first 3 latent channels (the released sampler's leftover; ``--guidance_channels all`` is the fix, FID
2.20-2.23 at 1.375 per the DiT authors). Any preset: ``--config.model.preset=DiT-B/4`` etc.

Trains on cached latents (``scripts/extract_latents.py``); the original's way, encoding images with the VAE at every
step, is ``--config.data.name=imagenet --config.data.root=data/imagenet``.
"""

from diffusion.config.recipes import dit_imagenet_recipe
from diffusion.config.schema import base_config


def get_config():
    return dit_imagenet_recipe(base_config(), resolution=256, steps=7_000_000)
