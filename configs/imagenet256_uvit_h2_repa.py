"""ImageNet 256x256 (32x32x4 SD-VAE latents), U-ViT-H/2 + REPA: configs/imagenet256_uvit_h2.py's backbone, data,
autoencoder, optimiser, run length, EMA and evaluation protocol, trained by flow matching with REPA's alignment term.
REPA's paper and code (Yu et al. 2025, github.com/sihyun-yu/REPA) have no U-ViT ImageNet run, so every choice below
that is not U-ViT-H/2's is either REPA's SiT-XL/2 setting (configs/imagenet256_sit_xl2_repa.py) or stated as ours.
No paper number stands behind this config.

* **Objective: the transport objective**, not U-ViT-H/2's discrete "stable diffusion" schedule. REPA regularises
  SiT's flow matching and this framework's REPA trainer refuses any other objective (diffusion/training/repa.py,
  ``check_repa``). As configs/cifar10_uvit_s2_fm.py: SiT's linear path x_t = t x1 + (1 - t) x0, velocity prediction,
  uniform training times, no weighting (REPA's ``--path-type linear --prediction v --weighting uniform``), trained
  in this project's own time direction (t = 0 noise; nothing is loaded from REPA, so there is no reason for
  ``time_direction="repa"``). U-ViT's time token is a sinusoidal embedding built for the network input ``999 t``,
  so ``diffusion.time_scale=999`` hands it the transport time on that scale.
* **REPA term**: DINOv2-B patch features (``--enc-type dinov2-vit-b``), a 3-layer MLP projector of width 2048,
  coefficient 0.5 (``--proj-coeff``), never stopped, REPA's default single label drop (not ``--legacy``): REPA's
  README "Training" values for SiT-XL/2.
* **Layer 8 of 29.** REPA taps SiT-XL/2 after block 8 of 28 (``--encoder-depth 8``), 2/7 of the depth; 2/7 of
  U-ViT-H/2's 29 blocks (14 in-blocks, the mid block, 14 out-blocks; the tap counts them in that order, 1-based) is
  8.3, so block 8: the 8th in-block, early in the encoder half, before the mid block and before any long skip
  connection is read back -- the early, pre-skip features REPA's alignment is about. At 256 px DINOv2-B gives
  16 x 16 patch tokens, U-ViT-H/2's own 16 x 16 grid (the label and time tokens are dropped by the tap), so no
  token resize is needed.
* **Training recipe: U-ViT-H/2's** (AdamW 2e-4, betas (0.99, 0.99), weight decay 0.03, 5K warmup, batch 1024, 500K
  steps, fp16, EMA 0.9999, 10% label dropout to the null class), the recipe tuned for this backbone; REPA's SiT
  optimiser (1e-4 constant, no decay, batch 256, gradient clipping 1.0) is not carried over.
* **Sampler: REPA's evaluation sampler** behind its FID 1.42 (README "Evaluation": generate.py ``--mode sde
  --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7``): ``repa_sde``, 250 Euler-Maruyama steps on REPA's grid,
  diffusion w = 1 - t (``linear``), a final noiseless mean step over 0.04, guidance w = 1.8 only while t >= 0.3
  (REPA's tau <= 0.7), fp32 with TF32 matmuls (generate.py ``--tf32``). Chosen over U-ViT's DPM-Solver++ (a
  sampler of the discrete VP schedule, which the transport objective does not run) and over SiT's dopri5 because it
  is the sampler REPA's own models are scored with; the guidance scale and interval were tuned by REPA for
  SiT-XL/2, not for this model, so sweep them before quoting a number. Previews: REPA train.py's 50-step Euler ODE
  (``repa_euler``).
* **Evaluation: U-ViT-H/2's protocol** (FID-10K of the EMA weights every 50K steps to pick the step, FID-50K of the
  best one, pytorch-fid against U-ViT's ``fid_stats_imagenet256_guided_diffusion.npz``), the selection unguided as
  U-ViT's train_ldm_discrete.py, with REPA's 50-step Euler ODE in place of DPM-Solver++.

Data: the parent's cached latents, extracted with the encoder's features beside them (``scripts/extract_latents.py
... --repa_encoders dinov2-vit-b``; a cache without them is refused by diffusion/training/repa.py), or the image
folder encoded on the fly (``--config.data.name=imagenet --config.data.root=data/imagenet/train``).

    accelerate launch --multi_gpu --num_processes 8 train.py --config=configs/imagenet256_uvit_h2_repa.py
"""

from pathlib import Path

from diffusion.config.loading import load_config


def get_config():
    config = load_config(Path(__file__).with_name("imagenet256_uvit_h2.py"))
    # flow matching in place of the discrete VP schedule (REPA needs the transport objective)
    config.diffusion.update(kind="transport", path="linear", prediction="velocity", loss_weight="none",
                            time_sampling="uniform", time_scale=999.0, time_direction="sit")
    config.repa.update(encoders="dinov2-vit-b", layer=8, projector_dim=2048, coeff=0.5, stop_at_step=0, legacy=False)
    # REPA's SDE sampler; t_end and skip_type belong to DPM-Solver++ and do not apply to the transport samplers
    config.sample.update(sampler="repa_sde", steps=250, t_end=None, skip_type=None, diffusion_form="linear",
                         diffusion_norm=1.0, last_step="mean", last_step_size=0.04, guidance_scale=1.8,
                         guidance_channels="all", guidance_t_lo=0.3, guidance_t_hi=1.0, precision="fp32", tf32=True,
                         quantize="truncate")  # generate.py's uint8 cast truncates
    config.preview.update(sampler="repa_euler", steps=50)
    config.eval.update(sampler="repa_euler", steps=50, guidance_scale=1.0)  # the unguided selection sampler
    return config
