"""Shared machinery for the U-ViT and DiT backbones: noise schedules and objectives, samplers, guidance,
datasets, configs, checkpoints and the training loop. Backbones live in ``uvit/`` and ``dit/``."""
