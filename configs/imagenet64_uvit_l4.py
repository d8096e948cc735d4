"""ImageNet 64x64, class-conditional U-ViT-L/4 (no guidance) on the continuous VP SDE (paper: FID 4.26, 50 NFE).
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling."""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-L/4")  # num_classes=1000, gradient checkpointing on
    config.diffusion.kind = "vp_sde"
    config.data.update(name="imagenet", root="data/imagenet", image_size=64, random_flip=True, num_workers=8)
    config.optim.update(lr=3e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=300_000, batch_size=1024, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="dpm_solver", steps=50, order=3, t_end=1e-4, skip_type="logSNR",
                         labels="train_freq", per_class=8)
    config.preview.update(steps=25)
    return config
