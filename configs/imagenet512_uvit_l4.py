"""ImageNet 512x512 (64x64x4 SD-VAE latents), U-ViT-L/4 on the continuous VP SDE (U-ViT paper: FID 4.67 with
guidance s = 0.7, i.e. w = 1.7, DPM-Solver 50 evaluations).

    accelerate launch scripts/extract_latents.py --data data/imagenet/train --out data/imagenet512_latents \\
        --resolution 512 --autoencoder assets/stable-diffusion/autoencoder_kl.pth
    accelerate launch --multi_gpu --num_processes 8 train.py --config=configs/imagenet512_uvit_l4.py
"""

from diffusion.config.recipes import uvit_latent_recipe
from diffusion.config.schema import base_config


def get_config():
    return uvit_latent_recipe(base_config(), 512, "U-ViT-L/4-512", "vp_sde",
                              autoencoder="assets/stable-diffusion/autoencoder_kl.pth", guidance_s=0.7)
