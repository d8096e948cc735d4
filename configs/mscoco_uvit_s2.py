"""MS-COCO 256x256 text-to-image, U-ViT-S/2 (13 layers) on SD-VAE latents (scale 0.23010) with CLIP ViT-L/14 text
tokens, discrete "stable diffusion" schedule (U-ViT paper: FID 5.95 on 30K val2014 captions, guidance s = 1, i.e.
w = 2, DPM-Solver++ 50 evaluations).
Recipe and sampler: docs/originals.md#u-vit-training-recipes and #u-vit-sampling.
Evaluation as U-ViT's train_t2i_discrete.py, eval_t2i_discrete.py and datasets.py: at every checkpoint
(``save_interval`` 50K) FID-10K of the EMA weights with DPM-Solver++ at 50 evaluations and the paper's guidance --
train_t2i_discrete.py's ``eval_step(n_samples=10000, sample_steps=50)`` samples through ``cfg_nnet``, i.e. with
``config.sample.scale`` = 1 (w = 2), unlike the class-conditional scripts -- on captions of val2014 (its
``test_dataset_loader``), picks the step; FID-30K of the best step with the sampler above (``config.sample.n_samples
= 30000``: one random caption for each of 30,000 distinct val2014 images, ``scripts/coco_prompts.py``); pytorch-fid
against U-ViT's ``fid_stats_mscoco256_val.npz`` (datasets.py ``MSCOCO256Features.fid_stat``); sampled under fp16
autocast (U-ViT's README: ``accelerate launch --mixed_precision fp16 eval_t2i_discrete.py``).

    accelerate launch scripts/extract_coco.py --root data/coco --split train --out data/mscoco256_features/train \\
        --autoencoder assets/stable-diffusion/autoencoder_kl.pth --clip openai/clip-vit-large-patch14
    accelerate launch scripts/extract_coco.py --root data/coco --split val --out data/mscoco256_features/val \\
        --autoencoder assets/stable-diffusion/autoencoder_kl.pth --clip openai/clip-vit-large-patch14   # eval.captions
    accelerate launch --multi_gpu --num_processes 4 train.py --config=configs/mscoco_uvit_s2.py
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.model.update(name="uvit", preset="U-ViT-S/2-T2I")
    config.diffusion.kind = "sd_discrete"
    config.cond.p_uncond = 0.1  # caption dropout to the empty caption's CLIP encoding
    # Cached image moments (no flips) and the CLIP ViT-L/14 tokens of every caption.
    config.data.update(name="coco_latents", root="data/mscoco256_features/train", image_size=256, random_flip=False,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="assets/stable-diffusion/autoencoder_kl.pth", scale_factor=0.23010)
    config.text_encoder.update(pretrained="openai/clip-vit-large-patch14", max_length=77)
    config.optim.update(lr=2e-4, betas=(0.9, 0.9), weight_decay=0.03, warmup_steps=5000)
    config.train.update(steps=1_000_000, batch_size=256, mixed_precision="fp16", ema_decay=0.9999, log_every=100,
                        ckpt_every=50_000, sample_every=5_000)
    # DPM-Solver++ (data prediction, singlestep "fast"), 50 evaluations on a time-uniform grid from 1 to 1e-3
    config.sample.update(sampler="dpm_solver++", steps=50, order=3, t_end=1e-3, skip_type="time_uniform",
                         guidance_scale=2.0, per_class=4)  # w = 1 + s, s = 1
    config.preview.update(steps=25)
    config.sample.update(n_samples=30_000, precision="fp16")  # U-ViT's config.sample.n_samples; fp16 autocast
    config.eval.update(every=50_000, n_samples=10_000, final_n_samples=30_000, sampler="dpm_solver++", steps=50,
                       guidance_scale=2.0, protocol="pytorch_fid",
                       reference="assets/fid_stats/fid_stats_mscoco256_val.npz",
                       captions="data/mscoco256_features/val")  # the in-training FID's captions: val2014
    return config
