"""MS-COCO 256x256 text-to-image, U-ViT-S/2-Deep (17 layers) (U-ViT paper: FID 5.48): mscoco_uvit_s2.py's recipe and
sampler and evaluation with the deeper preset (docs/originals.md#u-vit-training-recipes and #u-vit-sampling)."""

from pathlib import Path

from diffusion.config.loading import load_config


def get_config():
    config = load_config(Path(__file__).with_name("mscoco_uvit_s2.py"))
    config.model.preset = "U-ViT-S/2-Deep-T2I"  # the one difference
    return config
