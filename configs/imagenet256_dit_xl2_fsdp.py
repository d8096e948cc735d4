"""ImageNet 256x256 DiT-XL/2 (675M parameters) with DiT's recipe, as imagenet256_dit_xl2.py, trained fully sharded:
each DiT block's weights, gradients and AdamW state are split over the processes (FSDP2,
diffusion/training/distributed.py), which frees GPU memory for larger per-GPU batches. Same run and same checkpoints
as DDP (a run resumes across ``train.fsdp`` either way); needs a multi-process launch:

    accelerate launch --multi_gpu --num_processes=8 train.py --config=configs/imagenet256_dit_xl2_fsdp.py \\
        --workdir=runs/dit_xl2

Any other config shards the same way with ``--config.train.fsdp=full_shard`` (e.g. imagenet256_uvit_h2.py, whose
blocks are U-ViT's); ``shard_grad_op`` keeps each block's gathered weights from its forward to its backward.
"""

from diffusion.config.schema import base_config


def get_config():
    config = base_config()
    config.seed = 0
    # DiT's recipe (docs/originals.md#dit-training-recipe), the values of imagenet256_dit_xl2.py.
    config.model.update(name="dit", preset="DiT-XL/2", class_dropout_prob=0.1, learn_sigma=True, input_size=32,
                        in_channels=4, num_classes=1000)
    config.diffusion.update(kind="iddpm", num_steps=1000, beta_schedule="linear", learn_sigma=True)
    config.data.update(name="latents", root="data/imagenet256_latents", image_size=256, random_flip=True,
                       num_workers=8, verify_checksums=False)
    config.autoencoder.update(pretrained="stabilityai/sd-vae-ft-ema", scale_factor=0.18215)
    config.optim.update(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0)
    config.train.update(steps=7_000_000, batch_size=256, mixed_precision="no", tf32=True, ema_decay=0.9999,
                        grad_clip=0.0, log_every=100, ckpt_every=50_000, sample_every=10_000,
                        fsdp="full_shard")  # the one difference
    config.sample.update(sampler="ddpm", steps=250, guidance_scale=1.5, guidance_channels="3", labels="uniform",
                         per_class=4)
    config.preview.update(sampler="ddim", steps=50)
    return config
