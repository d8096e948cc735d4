"""Paper recipes (to move beside the configs)."""

from __future__ import annotations

import ml_collections


def dit_paper_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DiT's training recipe (Peebles & Xie, Sec. 4): AdamW lr 1e-4 constant, no weight decay, batch 256,
    EMA 0.9999, improved-DDPM hybrid loss with learned sigma, 10% label dropout (``model.class_dropout_prob``, the
    one source of the rate: ``cond.p_uncond`` stays None), fp32 with TF32 matmuls; 250-step DDPM sampling."""
    config.model.update(name="dit", preset="DiT-XL/2", class_dropout_prob=0.1, learn_sigma=True)
    config.diffusion = ml_collections.ConfigDict(dict(kind="iddpm", num_steps=1000, beta_schedule="linear",
                                                      learn_sigma=True))
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    config.train.update(batch_size=256, ema_decay=0.9999, grad_clip=0.0, mixed_precision="no", tf32=True)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="all")
    return config


def dit_imagenet_recipe(config: ml_collections.ConfigDict, resolution: int, steps: int) -> ml_collections.ConfigDict:
    """DiT-XL/2 on ImageNet SD-VAE latents with :func:`dit_paper_recipe`: cached latents of every image and its flip
    (``scripts/extract_latents.py``), the ft-EMA autoencoder, checkpoints every 50K steps, logs every 100. Sampling as
    behind the paper's FID: 250-step ancestral DDPM, guidance 1.5 on the first 3 latent channels (the released
    sampler's leftover; ``--guidance_channels all`` is the fix)."""
    config = dit_paper_recipe(config)
    config.seed = 0
    config.model.update(preset="DiT-XL/2", input_size=resolution // 8, in_channels=4, num_classes=1000)
    config.data.update(name="latents", root=f"data/imagenet{resolution}_latents", image_size=resolution,
                       random_flip=True, num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.train.update(steps=steps, log_every=100, ckpt_every=50_000, sample_every=10_000)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="3", labels="uniform",
                         per_class=4)
    config.preview.update(sampler="ddim", steps=50)
    return config


def uvit_latent_recipe(config: ml_collections.ConfigDict, resolution: int, preset: str, kind: str, autoencoder: str,
                       guidance_s: float) -> ml_collections.ConfigDict:
    """U-ViT's ImageNet 256/512 recipe on cached SD-VAE latents (SPEC.md section 1): batch 1024, AdamW 2e-4 with
    betas (0.99, 0.99) and weight decay 0.03, 5K warm-up steps, EMA 0.9999, fp16. The continuous-time L models
    train with 15% label dropout and sample with DPM-Solver (noise prediction, logSNR grid, t 1 -> 1e-4); the
    discrete-time H models with 10% and DPM-Solver++ (time-uniform grid, 1 -> 1e-3); both 50 evaluations.
    Guidance: U-ViT's ``s`` is ``w - 1`` in this project's ``eps_u + w (eps_c - eps_u)``."""
    config.seed = 1234
    config.model.update(name="uvit", preset=preset)
    config.diffusion.kind = kind
    config.cond.p_uncond = 0.15 if kind == "vp_sde" else 0.1
    config.data.update(name="latents", root=f"data/imagenet{resolution}_latents", image_size=resolution,
                       random_flip=True, num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained=autoencoder, scale_factor=0.18215)
    config.optim.update(lr=2e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    steps = 300_000 if kind == "vp_sde" and resolution == 256 else 500_000  # only ImageNet-256 L/2 stops at 300K
    config.train.update(steps=steps, batch_size=1024, mixed_precision="fp16",
                        ema_decay=0.9999, log_every=100, ckpt_every=50_000, sample_every=5_000)
    sampler = dict(sampler="dpm_solver", t_end=1e-4, skip_type="logSNR") if kind == "vp_sde" else dict(
        sampler="dpm_solver++", t_end=1e-3, skip_type="time_uniform")
    config.sample.update(**sampler, steps=50, order=3, guidance_scale=1.0 + guidance_s, labels="uniform",
                         per_class=4)
    config.preview.update(steps=25)
    return config


def uvit_t2i_recipe(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """U-ViT's MS-COCO recipe (SPEC.md section 1): cached image moments + CLIP ViT-L/14 caption tokens, discrete
    schedule, 10% caption dropout to the empty caption's encoding, batch 256, AdamW 2e-4 betas (0.9, 0.9) wd 0.03,
    5K warm-up, 1M steps, EMA 0.9999, fp16; DPM-Solver++ 50 evaluations with s = 1 (w = 2); scale 0.23010."""
    config.seed = 1234
    config.model.update(name="uvit", preset=preset)
    config.diffusion.kind = "sd_discrete"
    config.cond.p_uncond = 0.1
    config.data.update(name="coco_latents", root="data/mscoco256_features/train", image_size=256, random_flip=False,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="assets/stable-diffusion/autoencoder_kl.pth", scale_factor=0.23010)
    config.text_encoder.update(pretrained="openai/clip-vit-large-patch14", max_length=77)
    config.optim.update(lr=2e-4, betas=(0.9, 0.9), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=1_000_000, batch_size=256, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="dpm_solver++", steps=50, order=3, t_end=1e-3, skip_type="time_uniform",
                         guidance_scale=2.0, per_class=4)
    config.preview.update(steps=25)
    return config
