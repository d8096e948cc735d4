"""DiT quickstart: a small class-conditional adaLN-Zero DiT with learned sigma on the bundled 8x8 digits (CPU).

    python train.py --config=configs/digits_dit.py [--config.model.block_type=cross_attn]

DiT's recipe (docs/originals.md#dit-training-recipe) with small-data, short-run changes: a higher learning rate with
warm-up, a smaller batch and an EMA that forgets its random init.
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 0
    config.model.update(name="dit", preset=None, class_dropout_prob=0.1, learn_sigma=True, input_size=8, patch_size=2,
                        in_channels=1, hidden_size=64, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=10,
                        block_type="adaln_zero")
    config.diffusion.update(kind="iddpm", num_steps=1000, beta_schedule="linear", learn_sigma=True)  # hybrid loss
    config.data.update(name="digits", image_size=8, random_flip=False, num_workers=0)
    config.optim.update(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=100)
    config.train.update(steps=3000, batch_size=64, mixed_precision="no", tf32=True, ema_decay=0.999, ema_warmup=True,
                        grad_clip=0.0, log_every=100, ckpt_every=1000, sample_every=1000)
    config.sample.update(sampler="ddpm", steps=100, guidance_scale=2.0, guidance_channels="all", per_class=10,
                         clip_denoised=True)
    # FID curve on the digits classifier's features (Inception weights are not needed on the CPU quickstart)
    config.eval.update(metric="digits_accuracy", feature_extractor="digits", every=1000, n_samples=500,
                       batch_size=500)
    return config
