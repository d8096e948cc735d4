"""MS-COCO 256x256 text-to-image, U-ViT-S/2-Deep (17 layers) (U-ViT paper: FID 5.48). See mscoco_uvit_s2.py."""

from diffusion.config.recipes import uvit_t2i_recipe
from diffusion.config.schema import base_config


def get_config():
    return uvit_t2i_recipe(base_config(), "U-ViT-S/2-Deep-T2I")
