"""Quickstart: a 0.38M-parameter class-conditional U-ViT on scikit-learn's bundled 8x8 digits (CPU, minutes).

    python train.py --config=configs/digits_uvit.py
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 0
    config.model.update(name="uvit", img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=6, num_heads=4,
                        mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11, null_label=10, conv=True)
    config.diffusion.kind = "vp_sde"
    config.cond.p_uncond = 0.1
    config.data.update(name="digits", image_size=8, random_flip=False, num_workers=0)
    config.optim.update(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.03, warmup_steps=100)
    config.train.update(steps=3000, batch_size=64, ema_decay=0.999, ema_warmup=True, log_every=100, ckpt_every=1000,
                        sample_every=1000)
    config.sample.update(sampler="dpm_solver++2m", steps=50, guidance_scale=2.0, per_class=10)
    # FID curve on the digits classifier's features (Inception weights are not needed on the CPU quickstart)
    config.eval.update(metric="digits_accuracy", feature_extractor="digits", every=1000, n_samples=500,
                       batch_size=500)
    return config
