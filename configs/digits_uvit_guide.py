"""Autoguidance guide for the quickstart (configs/digits_uvit.py): the same data, objective and (no) autoencoder, a
U-ViT of half the width (embed_dim 32, 0.1M parameters) trained a quarter as long (750 steps): the "bad version of
itself" of Karras et al. 2024, which guides the main model in place of CFG's unconditional branch.

    python train.py --config=configs/digits_uvit.py                 # the main model -> runs/digits_uvit
    python train.py --config=configs/digits_uvit_guide.py           # this guide -> runs/digits_uvit_guide
    python sample.py --ckpt runs/digits_uvit --guide runs/digits_uvit_guide --guidance 2
"""

from pathlib import Path

from diffusion.config.loading import load_config


def get_config():
    config = load_config(Path(__file__).with_name("digits_uvit.py"))
    config.model.update(embed_dim=32, num_heads=2)  # half the width; the head width (16) stays the main's
    config.train.update(steps=750, ckpt_every=250, sample_every=250)  # a quarter of the main's 3000 steps
    config.eval.update(every=250)
    return config
