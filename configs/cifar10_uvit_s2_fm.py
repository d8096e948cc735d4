"""CIFAR-10 32x32, unconditional U-ViT-S/2 trained by flow matching: configs/cifar10_uvit_s2.py's backbone, data,
optimiser, run length and EMA with ``diffusion.kind=transport`` in place of the VP SDE -- SiT's linear path
x_t = t x1 + (1 - t) x0, velocity prediction, uniform training times.

U-ViT's time token is a sinusoidal embedding built for the VP SDE's network input ``999 t`` (as the original
U-ViT code feeds its continuous time; ``diffusion.objectives.vp``), so ``diffusion.time_scale=999`` hands it the
transport time t in [0, 1] on that same scale. Sampling: SiT's default, the adaptive dopri5 probability-flow ODE
(atol 1e-6, rtol 1e-3, SiT's defaults); previews use 50-point Heun. No paper number stands behind this config.
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-S/2", num_classes=-1)
    config.diffusion.update(kind="transport", path="linear", prediction="velocity", loss_weight="none",
                            time_scale=999.0)
    config.data.update(name="cifar10", root="data/cifar10", image_size=32, random_flip=True)
    config.optim.update(lr=2e-4, betas=(0.99, 0.999), weight_decay=0.03, warmup_steps=2500)
    config.train.update(steps=500_000, batch_size=128, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    config.sample.update(sampler="dopri5", steps=50, atol=1e-6, rtol=1e-3, num_unconditional=64)
    config.preview.update(sampler="heun2", steps=50)
    return config
