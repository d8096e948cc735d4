"""U-ViT backbone (Bao et al., CVPR 2023)."""

from uvit.model import PRESETS, UViT, timestep_embedding

__all__ = ["PRESETS", "UViT", "timestep_embedding"]
