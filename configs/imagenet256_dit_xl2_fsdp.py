"""ImageNet 256x256 DiT-XL/2 (675M parameters) with DiT's recipe, as imagenet256_dit_xl2.py, trained fully sharded:
each DiT block's weights, gradients and AdamW state are split over the processes (FSDP2,
diffusion/training/distributed.py), which frees GPU memory for larger per-GPU batches. Same run and same checkpoints
as DDP (a run resumes across ``train.fsdp`` either way); needs a multi-process launch:

    accelerate launch --multi_gpu --num_processes=8 train.py --config=configs/imagenet256_dit_xl2_fsdp.py \\
        --workdir=runs/dit_xl2

Any other config shards the same way with ``--config.train.fsdp=full_shard`` (e.g. imagenet256_uvit_h2.py, whose
blocks are U-ViT's); ``shard_grad_op`` keeps each block's gathered weights from its forward to its backward.
"""

from pathlib import Path

from diffusion.config.loading import load_config


def get_config():
    config = load_config(Path(__file__).with_name("imagenet256_dit_xl2.py"))
    config.train.fsdp = "full_shard"  # the one difference
    return config
