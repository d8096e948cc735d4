"""ImageNet 256x256 DiT-XL/2 (675M parameters) with DiT's recipe, as imagenet256_dit_xl2.py, trained fully sharded:
each DiT block's weights, gradients and AdamW state are split over the processes (FSDP2, diffusion/distributed.py),
which frees GPU memory for larger per-GPU batches. Same run and same checkpoints as DDP (a run resumes across
``train.fsdp`` either way); needs a multi-process launch:

    accelerate launch --multi_gpu --num_processes=8 train.py --config=configs/imagenet256_dit_xl2_fsdp.py \\
        --workdir=runs/dit_xl2

Any other config shards the same way with ``--config.train.fsdp=full_shard`` (e.g. imagenet256_uvit_h2.py, whose
blocks are U-ViT's); ``shard_grad_op`` keeps each block's gathered weights from its forward to its backward.
"""

from diffusion.config.recipes import dit_imagenet_recipe
from diffusion.config.schema import base_config


def get_config():
    config = dit_imagenet_recipe(base_config(), resolution=256, steps=7_000_000)
    config.train.fsdp = "full_shard"
    return config
