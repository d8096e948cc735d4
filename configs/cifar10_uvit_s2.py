"""CIFAR-10 32x32, unconditional U-ViT-S/2 on the continuous VP SDE (U-ViT paper: FID 3.11, 1000-step EM SDE).
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling."""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-S/2", num_classes=-1)
    config.diffusion.kind = "vp_sde"
    config.data.update(name="cifar10", root="data/cifar10", image_size=32, random_flip=True)
    config.optim.update(lr=2e-4, betas=(0.99, 0.999), weight_decay=0.03, warmup_steps=2500)
    config.train.update(steps=500_000, batch_size=128, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="euler_maruyama", steps=1000, t_end=1e-3, num_unconditional=64)
    config.preview.update(sampler="dpm_solver", steps=50)  # previews: 50 evaluations
    return config
