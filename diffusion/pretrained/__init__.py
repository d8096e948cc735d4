"""Frozen pretrained networks: they encode or decode, and are never trained here.

    autoencoder      Stable Diffusion's KL-f8 autoencoder (diffusers): images <-> latents
    text_encoder     U-ViT's CLIP ViT-L/14 text encoder (transformers): captions -> 77 x 768 contexts
    vision_encoders  REPA's DINOv2 / CLIP vision encoders (timm, transformers), local weights only
    dinov2           DINOv2 weights from torch.hub's key layout into timm's

Their weights are only read (``diffusion.weights``, the libraries' own loaders); datasets, training, sampling and
evaluation use them from the layers above.
"""
