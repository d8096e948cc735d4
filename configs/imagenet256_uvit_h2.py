"""ImageNet 256x256 (32x32x4 SD-VAE latents), U-ViT-H/2 on the discrete "stable diffusion" schedule (U-ViT paper:
FID 2.29 with guidance s = 0.4, i.e. w = 1.4, DPM-Solver++ 50 evaluations). Encodes and decodes with U-ViT's
EMA-finetuned autoencoder file (the cache's manifest must name the same autoencoder as the config).

    accelerate launch scripts/extract_latents.py --data data/imagenet/train --out data/imagenet256_latents \\
        --resolution 256 --autoencoder assets/stable-diffusion/autoencoder_kl_ema.pth
    accelerate launch --multi_gpu --num_processes 8 train.py --config=configs/imagenet256_uvit_h2.py
"""

from diffusion.config.recipes import uvit_latent_recipe
from diffusion.config.schema import base_config


def get_config():
    return uvit_latent_recipe(base_config(), 256, "U-ViT-H/2", "sd_discrete",
                              autoencoder="assets/stable-diffusion/autoencoder_kl_ema.pth", guidance_s=0.4)
