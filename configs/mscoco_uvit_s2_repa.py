"""MS-COCO 256x256 text-to-image, U-ViT-S/2 (13 layers) + REPA: configs/mscoco_uvit_s2.py's backbone, cached
features (SD-VAE latents, CLIP ViT-L/14 caption tokens), optimiser, run length, EMA and evaluation protocol, trained
by flow matching with REPA's alignment term. No paper number stands behind this config.

**What REPA's own text-to-image run is** (github.com/sihyun-yu/REPA at 67f7145: README "Training", "[12/17/2024]"
paragraph; train_t2i.py; generate_t2i.py; models/mmdit.py). It trains on U-ViT's MS-COCO features (the README:
"follow the data preprocessing protocol in U-ViT"; train_t2i.py's default ``--data-dir ../data/coco256_features``)
but its backbone is **not U-ViT**: train_t2i.py builds an ``MMDiT`` (models/mmdit.py, SD3-style joint text/image
blocks) at its defaults: depth 24, hidden 32 x depth = 768, 24 heads, patch 2 on the 32 x 32 latents. Its values,
recorded here:

* objective: linear path, velocity, uniform weighting (``--path-type linear --prediction v --weighting uniform``);
* alignment: DINOv2-B (``--enc-type dinov2-vit-b``), after block 8 of the MMDiT's 24 (``--encoder-depth 8``),
  coefficient 0.5 (``--proj-coeff 0.5``), projector width 2048 (MMDiT's ``projector_dim`` default);
* training: AdamW 1e-4, betas (0.9, 0.999), no weight decay, eps 1e-8, batch 256, gradient clipping 1.0, fp16 with
  TF32, 10% caption dropout (``--cfg-prob``), 400K steps (``--max-train-steps``), checkpoints every 50K; latents
  scaled by 0.18215 (train_t2i.py ``latents_scale``), decoded with sd-vae-ft-mse while training;
* sampling (generate_t2i.py defaults; the README gives no text-to-image evaluation command): the Euler ODE
  (``--mode ode``, ``euler_sampler``), 50 steps, guidance 1.5 over the whole interval (``--guidance-low 0
  --guidance-high 1``), the ft-EMA decoder (``--vae ema``), samples on val2014 captions packed into a
  40,192-sample .npz for an external FID, CLIP similarity printed on the way;
* reported FID: none in the repository (README or code).

**What this config is**, as the issue asks: U-ViT-S/2 on MS-COCO with REPA's encoder, depth and coefficient.

* **Objective: transport** (REPA's trainer refuses any other, diffusion/training/repa.py): as
  configs/cifar10_uvit_s2_fm.py, the linear path with velocity prediction and uniform times, in this project's time
  direction, U-ViT's time token fed ``999 t`` (``diffusion.time_scale=999``), in place of U-ViT's discrete schedule.
* **REPA term**: DINOv2-B, projector 2048, coefficient 0.5, never stopped, not ``--legacy``: REPA's values.
* **Layer 4 of 13.** REPA's depth 8 is a place in a 24-block MMDiT, a third of the way in (SiT-XL/2's 8 of 28:
  2/7). U-ViT-S/2 has 13 blocks (6 in-blocks, the mid block, 6 out-blocks, counted in that order): block 8 itself
  would be the first out-block, past the mid block and reading a long skip connection, no longer an early layer.
  A third (4.3) and 2/7 (3.7) of 13 both round to 4: the 4th in-block. At 256 px DINOv2-B's 16 x 16 patch tokens
  match U-ViT-S/2's 16 x 16 grid (the time and 77 text tokens are dropped by the tap).
* **Training recipe: U-ViT-S/2's** (AdamW 2e-4, betas (0.9, 0.9), weight decay 0.03, 5K warmup, batch 256, 1M
  steps, fp16, EMA 0.9999, 10% caption dropout), tuned for this backbone; REPA's MMDiT optimiser and its 400K steps
  are recorded above, not carried over. The latents keep U-ViT's scale 0.23010 (REPA's 0.18215 is for the same
  cached moments; the scale is the autoencoder section's, shared with the parent's features).
* **Sampler: REPA's text-to-image sampler**, generate_t2i.py's defaults: ``repa_euler`` (REPA's Euler ODE grid),
  50 steps, guidance 1.5 everywhere, fp32 with TF32 matmuls (generate_t2i.py ``--tf32`` default). REPA tuned nothing
  of it for U-ViT-S/2 (U-ViT's own sampler used w = 2): sweep the guidance before quoting a number.
* **Evaluation: U-ViT's MS-COCO protocol** (FID-10K every 50K steps on val2014 captions with the sampler above,
  guided as U-ViT's train_t2i_discrete.py; FID-30K of the best step, pytorch-fid against U-ViT's
  ``fid_stats_mscoco256_val.npz``), not REPA's 40,192-sample .npz.

Data: the parent's cached COCO features, extracted with the encoder's features beside them
(``scripts/extract_coco.py ... --repa_encoders dinov2-vit-b``; a cache without them is refused by
diffusion/training/repa.py).

    accelerate launch --multi_gpu --num_processes 4 train.py --config=configs/mscoco_uvit_s2_repa.py
"""

from pathlib import Path

from diffusion.config.loading import load_config


def get_config():
    config = load_config(Path(__file__).with_name("mscoco_uvit_s2.py"))
    # flow matching in place of the discrete VP schedule (REPA needs the transport objective)
    config.diffusion.update(kind="transport", path="linear", prediction="velocity", loss_weight="none",
                            time_sampling="uniform", time_scale=999.0, time_direction="sit")
    config.repa.update(encoders="dinov2-vit-b", layer=4, projector_dim=2048, coeff=0.5, stop_at_step=0, legacy=False)
    # REPA's T2I Euler ODE; t_end and skip_type belong to DPM-Solver++ and do not apply to the transport samplers
    config.sample.update(sampler="repa_euler", steps=50, t_end=None, skip_type=None, guidance_scale=1.5,
                         guidance_channels="all", guidance_t_lo=0.0, guidance_t_hi=1.0, precision="fp32", tf32=True,
                         quantize="truncate")  # generate_t2i.py's uint8 cast truncates
    config.preview.update(sampler="repa_euler", steps=50)
    config.eval.update(sampler="repa_euler", steps=50, guidance_scale=1.5)  # selection guided, as U-ViT's T2I
    return config
