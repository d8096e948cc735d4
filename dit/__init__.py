"""DiT backbone (Peebles & Xie, ICCV 2023)."""

from dit.model import BLOCK_TYPES, PRESETS, DiT, count_params

__all__ = ["BLOCK_TYPES", "DiT", "PRESETS", "count_params"]
