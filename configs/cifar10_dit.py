"""CIFAR-10 32x32, class-conditional DiT-B/2 in pixel space with DiT's recipe (AdamW 1e-4, no weight decay,
batch 256, EMA 0.9999, hybrid loss, learned sigma; docs/originals.md#dit-training-recipe) in bf16 for 400K steps.
Any preset: --config.model.preset=DiT-S/2 etc. Not a paper row: DiT reported ImageNet only."""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 0
    # 10% label dropout inside the model (the one source of the rate: cond.p_uncond stays None); learned sigma.
    config.model.update(name="dit", preset="DiT-B/2", class_dropout_prob=0.1, learn_sigma=True, input_size=32,
                        in_channels=3, num_classes=10, block_type="adaln_zero")
    config.diffusion.update(kind="iddpm", num_steps=1000, beta_schedule="linear", learn_sigma=True)  # hybrid loss
    config.data.update(name="cifar10", root="data/cifar10", image_size=32, random_flip=True)
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    config.train.update(steps=400_000, batch_size=256, mixed_precision="bf16", tf32=True, ema_decay=0.9999,
                        grad_clip=0.0, log_every=100, ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="all", per_class=8,
                         clip_denoised=True)  # pixels: x0 predictions clamped to [-1, 1]
    return config
