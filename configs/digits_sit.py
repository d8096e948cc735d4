"""Flow-matching quickstart: SiT on the bundled 8x8 digits (CPU), the DiT quickstart's backbone trained as SiT does.

    python train.py --config=configs/digits_sit.py [--config.sample.sampler=dopri5]

The backbone of configs/digits_dit.py (class-conditional adaLN-Zero DiT, learned sigma kept as SiT keeps it: the
extra output channels are ignored by the objective) on SiT's interpolant transport: the linear path
x_t = t x1 + (1 - t) x0, velocity prediction, uniform training times, the network fed t in [0, 1]
(docs: docs/flow_matching.md). The run's length, batch, optimiser and EMA are the DiT quickstart's. Sampling:
Heun on the probability-flow ODE (SiT's ``num_steps`` convention: 50 grid points, 49 steps), guidance 2 on all
channels; SiT's own default, adaptive dopri5, is ``--config.sample.sampler=dopri5``.
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 0
    config.model.update(name="dit", preset=None, class_dropout_prob=0.1, learn_sigma=True, input_size=8, patch_size=2,
                        in_channels=1, hidden_size=64, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=10,
                        block_type="adaln_zero")
    config.diffusion.update(kind="transport", path="linear", prediction="velocity", loss_weight="none")
    config.data.update(name="digits", image_size=8, random_flip=False, num_workers=0)
    config.optim.update(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=100)
    config.train.update(steps=3000, batch_size=64, mixed_precision="no", tf32=True, ema_decay=0.999, ema_warmup=True,
                        grad_clip=0.0, log_every=100, ckpt_every=1000, sample_every=1000)
    config.sample.update(sampler="heun2", steps=50, guidance_scale=2.0, guidance_channels="all", per_class=10)
    # FID curve on the digits classifier's features (Inception weights are not needed on the CPU quickstart)
    config.eval.update(metric="digits_accuracy", feature_extractor="digits", every=1000, n_samples=500,
                       batch_size=500)
    return config
