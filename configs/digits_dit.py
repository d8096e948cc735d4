"""DiT quickstart: a small class-conditional adaLN-Zero DiT with learned sigma on the bundled 8x8 digits (CPU).

    python train.py --config=configs/digits_dit.py [--config.model.block_type=cross_attn]
"""

from diffusion.config.recipes import dit_paper_recipe
from diffusion.config.schema import base_config


def get_config():
    config = dit_paper_recipe(base_config())
    config.model.update(preset=None, input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=6,
                        num_heads=4, mlp_ratio=4.0, num_classes=10, block_type="adaln_zero")
    config.data.update(name="digits", image_size=8, random_flip=False, num_workers=0)
    # Small-data, short-run changes to the paper recipe: higher LR with warm-up, EMA that forgets its init.
    config.optim.update(lr=2e-3, betas=(0.9, 0.99), warmup_steps=100)
    config.train.update(steps=3000, batch_size=64, ema_decay=0.999, ema_warmup=True, log_every=100,
                        ckpt_every=1000, sample_every=1000)
    config.sample.update(sampler="ddpm", steps=100, guidance_scale=2.0, per_class=10, clip_denoised=True)
    # FID curve on the digits classifier's features (Inception weights are not needed on the CPU quickstart)
    config.eval.update(metric="digits_accuracy", feature_extractor="digits", every=1000, n_samples=500,
                       batch_size=500)
    return config
