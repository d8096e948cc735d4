"""CelebA 64x64, unconditional U-ViT-S/4 on the continuous VP SDE (U-ViT paper: FID 2.87, 1000-step EM SDE).
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling."""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-S/4")
    config.diffusion.kind = "vp_sde"
    config.data.update(name="celeba64", root="data/celeba", image_size=64, random_flip=True)
    config.optim.update(lr=2e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=500_000, batch_size=128, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="euler_maruyama", steps=1000, t_end=1e-3, num_unconditional=64)
    config.preview.update(sampler="dpm_solver", steps=50)  # previews: 50 evaluations
    return config
