"""CIFAR-10 32x32, class-conditional DiT-B/2 in pixel space with DiT's recipe (AdamW 1e-4, no weight decay,
batch 256, EMA 0.9999, hybrid loss, learned sigma). Any preset: --config.model.preset=DiT-S/2 etc."""

from diffusion.config.recipes import dit_paper_recipe
from diffusion.config.schema import base_config


def get_config():
    config = dit_paper_recipe(base_config())
    config.seed = 0
    config.model.update(preset="DiT-B/2", input_size=32, in_channels=3, num_classes=10, block_type="adaln_zero")
    config.data.update(name="cifar10", root="data/cifar10", image_size=32, random_flip=True)
    config.train.update(steps=400_000, mixed_precision="bf16", log_every=100, ckpt_every=50_000, sample_every=5_000)
    config.sample.update(per_class=8, clip_denoised=True)
    return config
