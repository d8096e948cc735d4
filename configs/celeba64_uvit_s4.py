"""CelebA 64x64, unconditional U-ViT-S/4 on the continuous VP SDE (U-ViT paper: FID 2.87, 1000-step EM SDE).
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling.
Evaluation as U-ViT's train.py, eval.py and datasets.py: at every checkpoint (``save_interval`` 50K) FID-10K of the
EMA weights with DPM-Solver at 50 evaluations, unguided -- train.py's ``eval_step(n_samples=10000, sample_steps=50,
algorithm='dpm_solver')``: ``dpm_solver_pytorch.py``, ``eps=1e-4``, ``fast_version=True``, logSNR grid -- picks the
step; FID-50K of the best step with the sampler above (``config.sample.n_samples``); pytorch-fid against U-ViT's
``fid_stats_celeba64_train_50000_ddim.npz`` (datasets.py ``CelebA.fid_stat``); sampled under fp16 autocast (U-ViT's
README: ``accelerate launch --mixed_precision fp16 eval.py``).
The selection sampler is not the paper's (Euler-Maruyama, 1000 steps): train.py selects with DPM-Solver for every
pixel model, on its own grid (logSNR, t 1 -> 1e-4), not on ``sample.t_end`` (the Euler-Maruyama end time).
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-S/4")
    config.diffusion.kind = "vp_sde"
    config.data.update(name="celeba64", root="data/celeba", image_size=64, random_flip=True)
    config.optim.update(lr=2e-4, betas=(0.99, 0.99), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=500_000, batch_size=128, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="euler_maruyama", steps=1000, t_end=1e-3, num_unconditional=64)
    config.preview.update(sampler="dpm_solver", steps=50)  # previews: 50 evaluations
    config.sample.update(n_samples=50_000, precision="fp16")  # U-ViT's config.sample.n_samples; fp16 autocast
    config.eval.update(every=50_000, n_samples=10_000, final_n_samples=50_000, sampler="dpm_solver", steps=50,
                       guidance_scale=1.0, protocol="pytorch_fid",
                       reference="assets/fid_stats/fid_stats_celeba64_train_50000_ddim.npz")
    return config
