"""The data side: datasets, the resumable training stream, cached features and their extraction (the codecs they
use, the Stable Diffusion autoencoder and the CLIP text encoder, are in :mod:`diffusion.pretrained`)."""
