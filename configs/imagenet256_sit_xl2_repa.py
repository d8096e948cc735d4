"""ImageNet 256x256 (32x32x4 SD-VAE latents), SiT-XL/2 + REPA with REPA's recipe (Yu et al. 2025, sihyun-yu/REPA
README "Training" and train.py): REPA's SiT is SiT-XL/2's network without the learned-sigma half (``out_channels =
in_channels``: ``learn_sigma=False``), trained in REPA's time direction (t = 0 data, t = 1 noise:
``diffusion.time_direction="repa"``; the objective feeds the network 1 - t and negates its velocity, so SiT's loss and
samplers apply, diffusion/objectives/repa_time.py) on the linear path with velocity prediction, uniform times, no
weighting (``--path-type linear --prediction v --weighting uniform``), plus REPA's alignment term: the hidden states
after block 8 (``--encoder-depth 8``) through a 3-layer MLP projector of width 2048 aligned with DINOv2-B's patch
features (``--enc-type dinov2-vit-b``), coefficient 0.5 (``--proj-coeff``). AdamW 1e-4 constant, betas (0.9, 0.999),
no weight decay, eps 1e-8, global batch 256, fp16 mixed precision (``--mixed-precision fp16``) with TF32 matmuls
(``--allow-tf32``), gradient clipping at norm 1.0 (``--max-grad-norm``), EMA 0.9999 from the first step, 10% label
dropout inside the model (REPA's default, not ``--legacy``), checkpoints every 50K; 4M steps, the length of the
released checkpoint's run (README: "trained for 4M iterations"; train.py's own default is 400K). REPA trains on
SD-VAE ft-MSE latents without flips (its preprocessing/dataset.py); the ft-EMA autoencoder below has the same
encoder and is what generate.py decodes with (``--vae ema``).

Sampling defaults are those behind REPA's FID-50K 1.42 (README "Evaluation"): generate.py ``--mode sde --num-steps
250 --cfg-scale 1.8 --guidance-high 0.7`` (``--guidance-low 0``, ``--path-type linear``): REPA's Euler-Maruyama
sampler (``repa_sde``: REPA's grid linspace(1, 0.04, 250) then 0 in its time, diffusion 2 tau = SiT's ``linear``
form w = 1 - t, which on the linear path equals ``sigma``; a final noiseless mean step over 0.04; one network
evaluation per step), guidance 1.8 on every latent channel while REPA's tau <= 0.7, i.e. SiT's t >= 0.3
(``guidance_t_lo=0.3``, ``guidance_t_hi=1``), fp32 with TF32 matmuls (generate.py ``--tf32``), 50K samples with
uniform labels, quantised to uint8 by truncation as generate.py does (``quantize="truncate"``: on average half a
grey level darker than rounding; diffusion/sampling/pixels.py). REPA's ODE sampler is ``--sampler=repa_euler``
(generate.py's default mode; ``--heun``: ``repa_heun``) at ``--steps=50``. Previews as train.py's: ``repa_euler``,
50 steps (train.py guides them at 4.0).

Evaluation as REPA's: FID-50K of the EMA weights with ADM's evaluator against ADM's reference batch
``VIRTUAL_imagenet256_labeled.npz``, no in-training FID. The released checkpoint (``last.pt``, REPA's utils.py
download name) loads by name: ``python sample.py --ckpt=last.pt --out=samples.npz``.
"""

from diffusion.config.schema import base_config

STEPS = 4_000_000
BATCH = 256


def get_config():
    config = base_config()
    config.seed = 0
    config.model.update(name="dit", preset="SiT-XL/2", class_dropout_prob=0.1, learn_sigma=False, input_size=32,
                        in_channels=4, num_classes=1000)
    config.diffusion.update(kind="transport", path="linear", prediction="velocity", loss_weight="none",
                            time_sampling="uniform", time_scale=1.0, time_direction="repa")
    config.repa.update(encoders="dinov2-vit-b", layer=8, projector_dim=2048, coeff=0.5, stop_at_step=0, legacy=False)
    config.data.update(name="latents", root="data/imagenet256_latents", image_size=256, random_flip=False,
                       num_workers=4, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0)
    config.train.update(steps=STEPS, batch_size=BATCH, mixed_precision="fp16", tf32=True, ema_decay=0.9999,
                        grad_clip=1.0, log_every=100, ckpt_every=50_000, sample_every=10_000)
    config.sample.update(sampler="repa_sde", steps=250, diffusion_form="linear", diffusion_norm=1.0,
                         last_step="mean", last_step_size=0.04, guidance_scale=1.8, guidance_channels="all",
                         guidance_t_lo=0.3, guidance_t_hi=1.0, labels="uniform", per_class=4, n_samples=50_000,
                         precision="fp32", tf32=True, quantize="truncate")
    config.preview.update(sampler="repa_euler", steps=50)
    config.eval.update(every=0, final_n_samples=0, protocol="adm", reference="data/VIRTUAL_imagenet256_labeled.npz")
    return config
