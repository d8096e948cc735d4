"""ImageNet 256x256 (32x32x4 SD-VAE latents), U-ViT-L/2 on the continuous VP SDE (U-ViT paper: FID 3.40 with
guidance s = 0.4, i.e. w = 1.4, DPM-Solver 50 evaluations). Latents decode with U-ViT's original KL-f8 autoencoder.

    accelerate launch scripts/extract_latents.py --data data/imagenet/train --out data/imagenet256_latents \\
        --resolution 256 --autoencoder assets/stable-diffusion/autoencoder_kl.pth
    accelerate launch --multi_gpu --num_processes 8 train.py --config=configs/imagenet256_uvit_l2.py
"""

from diffusion.config.recipes import uvit_latent_recipe
from diffusion.config.schema import base_config


def get_config():
    return uvit_latent_recipe(base_config(), 256, "U-ViT-L/2", "vp_sde",
                              autoencoder="assets/stable-diffusion/autoencoder_kl.pth", guidance_s=0.4)
