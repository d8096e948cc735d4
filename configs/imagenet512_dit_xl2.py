"""ImageNet 512x512 (64x64x4 SD-VAE latents), DiT-XL/2 with DiT's recipe (paper: FID 3.04 with guidance 1.5 on the
first 3 channels, 250-step DDPM; the 512 model trained for 3M steps at batch 256). See imagenet256_dit_xl2.py."""

from diffusion.config import base_config, dit_paper_recipe


def get_config():
    config = dit_paper_recipe(base_config())
    config.seed = 0
    config.model.update(preset="DiT-XL/2", input_size=64, in_channels=4, num_classes=1000)
    config.data.update(name="latents", root="data/imagenet512_latents", image_size=512, random_flip=True,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.train.update(steps=3_000_000, log_every=100, ckpt_every=50_000, sample_every=10_000)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="3", labels="uniform",
                         per_class=4)
    config.preview.update(sampler="ddim", steps=50)
    return config
