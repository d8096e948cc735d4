"""The data side: datasets, the resumable training stream, cached features and their extraction, and the codecs
(Stable Diffusion autoencoder, CLIP text encoder)."""
