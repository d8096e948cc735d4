"""MS-COCO 256x256 text-to-image, U-ViT-S/2 (13 layers) on SD-VAE latents (scale 0.23010) with CLIP ViT-L/14 text
tokens, discrete "stable diffusion" schedule (U-ViT paper: FID 5.95 on 30K val2014 captions, guidance s = 1, i.e.
w = 2, DPM-Solver++ 50 evaluations).

    accelerate launch scripts/extract_coco.py --root data/coco --split train --out data/mscoco256_features/train \\
        --autoencoder assets/stable-diffusion/autoencoder_kl.pth --clip openai/clip-vit-large-patch14
    accelerate launch --multi_gpu --num_processes 4 train.py --config=configs/mscoco_uvit_s2.py
"""

from diffusion.config.recipes import uvit_t2i_recipe
from diffusion.config.schema import base_config


def get_config():
    return uvit_t2i_recipe(base_config(), "U-ViT-S/2-T2I")
