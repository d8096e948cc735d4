"""ImageNet 64x64, class-conditional U-ViT-M/4 (no guidance) on the continuous VP SDE (paper: FID 5.85, 50 NFE).
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling.
Evaluation as U-ViT's train.py, eval.py and datasets.py: at every checkpoint (``save_interval`` 50K) FID-10K of the
EMA weights with DPM-Solver at 50 evaluations, unguided -- train.py's ``eval_step(n_samples=10000, sample_steps=50,
algorithm='dpm_solver')``: ``dpm_solver_pytorch.py``, ``eps=1e-4``, ``fast_version=True``, logSNR grid -- picks the
step; FID-50K of the best step with the sampler above (``config.sample.n_samples``); pytorch-fid against U-ViT's
``fid_stats_imagenet64_guided_diffusion.npz`` (datasets.py ``ImageNet.fid_stat``); sampled under fp16 autocast
(U-ViT's README: ``accelerate launch --mixed_precision fp16 eval.py``).
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-M/4")  # num_classes=1000, gradient checkpointing on
    config.diffusion.kind = "vp_sde"
    config.data.update(name="imagenet", root="data/imagenet", image_size=64, random_flip=True, num_workers=8)
    config.optim.update(lr=3e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=300_000, batch_size=1024, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="dpm_solver", steps=50, order=3, t_end=1e-4, skip_type="logSNR",
                         labels="train_freq", per_class=8)
    config.preview.update(steps=25)
    config.sample.update(n_samples=50_000, precision="fp16")  # U-ViT's config.sample.n_samples; fp16 autocast
    config.eval.update(every=50_000, n_samples=10_000, final_n_samples=50_000, sampler="dpm_solver", steps=50,
                       guidance_scale=1.0, protocol="pytorch_fid",
                       reference="assets/fid_stats/fid_stats_imagenet64_guided_diffusion.npz")
    return config
