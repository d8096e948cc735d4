"""ImageNet 512x512 (64x64x4 SD-VAE latents), DiT-XL/2 with DiT's recipe (paper: FID 3.04 with guidance 1.5 on the
first 3 channels, 250-step DDPM; the 512 model trained for 3M steps at batch 256). As imagenet256_dit_xl2.py but for
the resolution and the step count; sources: docs/originals.md#dit-training-recipe and #dit-results.

Evaluation as DiT's (README "Evaluation", sample_ddp.py): FID-50K of the final checkpoint's EMA weights, no
in-training FID (``eval.every=0``), the sampler above with ``--num-fid-samples 50_000`` in fp32 with TF32 matmuls
(sample_ddp.py's ``--tf32`` default), scored by ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``)
against ADM's reference batch ``VIRTUAL_imagenet512.npz`` (guided-diffusion ``evaluations/README.md``).
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 0
    # 10% label dropout inside the model (the one source of the rate: cond.p_uncond stays None); learned sigma.
    config.model.update(name="dit", preset="DiT-XL/2", class_dropout_prob=0.1, learn_sigma=True, input_size=64,
                        in_channels=4, num_classes=1000)
    config.diffusion.update(kind="iddpm", num_steps=1000, beta_schedule="linear", learn_sigma=True)  # hybrid loss
    # Cached moments of every image and its flip, made by the encoder of the autoencoder below (weights checked).
    config.data.update(name="latents", root="data/imagenet512_latents", image_size=512, random_flip=True,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    config.train.update(steps=3_000_000, batch_size=256, mixed_precision="no", tf32=True, ema_decay=0.9999,
                        grad_clip=0.0, log_every=100, ckpt_every=50_000, sample_every=10_000)
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="3", labels="uniform",
                         per_class=4)
    config.preview.update(sampler="ddim", steps=50)
    config.sample.update(n_samples=50_000, precision="fp32", tf32=True)  # sample_ddp.py: 50K, --tf32 on
    # the final checkpoint only
    config.eval.update(every=0, final_n_samples=0, protocol="adm", reference="data/VIRTUAL_imagenet512.npz")
    return config
