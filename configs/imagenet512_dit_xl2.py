"""ImageNet 512x512 (64x64x4 SD-VAE latents), DiT-XL/2 with DiT's recipe (paper: FID 3.04 with guidance 1.5 on the
first 3 channels, 250-step DDPM; the 512 model trained for 3M steps at batch 256). See imagenet256_dit_xl2.py."""

from diffusion.config.recipes import dit_imagenet_recipe
from diffusion.config.schema import base_config


def get_config():
    return dit_imagenet_recipe(base_config(), resolution=512, steps=3_000_000)
