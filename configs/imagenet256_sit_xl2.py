"""ImageNet 256x256 (32x32x4 SD-VAE latents), SiT-XL/2 with SiT's recipe (Ma et al. 2024, willisma/SiT train.py): the
DiT-XL/2 backbone (preset SiT-XL/2, the same network; learned sigma kept, its extra channels ignored) fed t in [0, 1],
trained on the linear path x_t = t x1 + (1 - t) x0 with velocity prediction, uniform times, no loss weight (SiT's
defaults). AdamW 1e-4 constant, no weight decay, global batch 256, EMA 0.9999, 1400 epochs (train.py's ``--epochs``;
1,281,167 images, 5,004 full batches of 256 per epoch as its drop_last loader takes them: 7,005,600 steps),
checkpoints every 50K, log every 100, 10% label dropout, the SD-VAE latents of configs/imagenet256_dit_xl2.py (scale
0.18215).

Sampling defaults are those behind SiT-XL/2's FID-50K 2.06 (the abstract's and README's number, the paper's best
ImageNet-256 result, reached with the SDE sampler and its diffusion coefficient w_t = sigma_t, guidance 1.5): SiT's
``sample_ddp.py SDE`` with its defaults -- Euler-Maruyama (``--sampling-method Euler``), 250 steps
(``--num-sampling-steps``), ``--diffusion-form sigma --diffusion-norm 1``, a final mean step over 0.04 (``--last-step
Mean --last-step-size 0.04``) -- and ``--cfg-scale 1.5``, guidance on the first 3 latent channels as SiT's
``forward_with_cfg`` applies it. SiT's README samples pictures with ``sample.py ODE`` (dopri5, atol 1e-6, rtol 1e-3,
guidance 4.0): ``--config.sample.sampler=dopri5``. Any of SiT's presets: ``--config.model.preset=SiT-B/4`` etc. (DiT's
networks, SiT's names).

Evaluation as SiT's (README, ``sample_ddp.py``): FID-50K (``--num-fid-samples 50_000``) of the final checkpoint's EMA
weights, no in-training FID, fp32 with TF32 matmuls (``--tf32`` default), ADM's evaluator against ADM's reference
batch ``VIRTUAL_imagenet256_labeled.npz`` (guided-diffusion ``evaluations/README.md``).

Trains on cached latents (``scripts/extract_latents.py``); the original's way, encoding images with the VAE at every
step, is ``--config.data.name=imagenet --config.data.root=data/imagenet``.
"""

from diffusion.config.schema import base_config

IMAGENET_TRAIN_IMAGES = 1_281_167
EPOCHS = 1400
BATCH = 256


def get_config():
    config = base_config()
    config.seed = 0
    config.model.update(name="dit", preset="SiT-XL/2", class_dropout_prob=0.1, learn_sigma=True, input_size=32,
                        in_channels=4, num_classes=1000)
    config.diffusion.update(kind="transport", path="linear", prediction="velocity", loss_weight="none",
                            time_scale=1.0)
    # Cached moments of every image and its flip, made by the encoder of the autoencoder below (weights checked).
    config.data.update(name="latents", root="data/imagenet256_latents", image_size=256, random_flip=True,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    config.train.update(steps=EPOCHS * (IMAGENET_TRAIN_IMAGES // BATCH), batch_size=BATCH, mixed_precision="no",
                        tf32=True, ema_decay=0.9999, grad_clip=0.0, log_every=100, ckpt_every=50_000,
                        sample_every=10_000)
    config.sample.update(sampler="sde_euler", steps=250, diffusion_form="sigma", diffusion_norm=1.0, last_step="mean",
                         last_step_size=0.04, guidance_scale=1.5, guidance_channels="3", labels="uniform", per_class=4)
    config.preview.update(sampler="heun2", steps=50)
    config.sample.update(n_samples=50_000, precision="fp32", tf32=True)  # sample_ddp.py: 50K, --tf32 on
    config.eval.update(every=0, final_n_samples=0, protocol="adm", reference="data/VIRTUAL_imagenet256_labeled.npz")
    return config
