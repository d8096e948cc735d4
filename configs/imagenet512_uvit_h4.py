"""ImageNet 512x512 (64x64x4 SD-VAE latents), U-ViT-H/4 on the discrete "stable diffusion" schedule (U-ViT paper:
FID 4.05 with guidance s = 0.7, i.e. w = 1.7, DPM-Solver++ 50 evaluations), EMA-finetuned decoder.
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling.
Evaluation as U-ViT's train_ldm_discrete.py, eval_ldm_discrete.py and datasets.py: at every checkpoint
(``save_interval`` 50K) FID-10K of the EMA weights with DPM-Solver++ at 50 evaluations, unguided
(train_ldm_discrete.py's ``eval_step(n_samples=10000, sample_steps=50)``: ``dpm_solver_pp.py``, ``predict_x0=True``,
``eps=1/N``, the network without guidance), picks the step; FID-50K of the best step with the sampler and guidance
above (eval_ldm_discrete.py applies ``config.sample.scale``); pytorch-fid against U-ViT's
``fid_stats_imagenet512_guided_diffusion.npz`` (datasets.py ``ImageNet512Features.fid_stat``); sampled under fp16
autocast (U-ViT's README: ``accelerate launch --mixed_precision fp16 eval_ldm_discrete.py``).

    accelerate launch scripts/extract_latents.py --data data/imagenet/train --out data/imagenet512_latents \\
        --resolution 512 --autoencoder assets/stable-diffusion/autoencoder_kl_ema.pth
    accelerate launch --multi_gpu --num_processes 8 train.py --config=configs/imagenet512_uvit_h4.py
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-H/4-512")
    config.diffusion.kind = "sd_discrete"
    config.cond.p_uncond = 0.1  # label dropout to the null class 1000 (num_classes 1001)
    # Cached moments of every image and its flip, made by the encoder of the autoencoder below (weights checked).
    config.data.update(name="latents", root="data/imagenet512_latents", image_size=512, random_flip=True,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="assets/stable-diffusion/autoencoder_kl_ema.pth", scale_factor=0.18215)
    config.optim.update(lr=2e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=500_000, batch_size=1024, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    # DPM-Solver++ (data prediction, singlestep "fast"), 50 evaluations on a time-uniform grid from 1 to 1e-3
    config.sample.update(sampler="dpm_solver++", t_end=1e-3, skip_type="time_uniform", steps=50, order=3,
                         guidance_scale=1.7, labels="uniform", per_class=4)  # w = 1 + s, s = 0.7
    config.preview.update(steps=25)
    config.sample.update(n_samples=50_000, precision="fp16")  # U-ViT's config.sample.n_samples; fp16 autocast
    config.eval.update(every=50_000, n_samples=10_000, final_n_samples=50_000, sampler="dpm_solver++", steps=50,
                       guidance_scale=1.0, protocol="pytorch_fid",
                       reference="assets/fid_stats/fid_stats_imagenet512_guided_diffusion.npz")
    return config
