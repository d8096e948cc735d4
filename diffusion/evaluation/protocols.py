"""The evaluation protocols: every rule that decides a score, named after the evaluator a paper's numbers come from
(``eval_fid.py --protocol``, ``eval.protocol``).

    pytorch_fid  pytorch-fid's front end (uint8 / 255, bilinear resize to 299 with half-pixel centres, 2 x - 1); the
                 reference's statistics as given (a statistics file) or computed here from its images (an ADM batch's
                 stored ones only when asked: ``--adm_stats``); IS over 10 equal splits; precision/recall distances
                 in float32. U-ViT's numbers (with its statistics files).
    adm          ADM's ``evaluations/evaluator.py`` numerically: its front end (float [0, 255], TF1's ResizeBilinear
                 without half-pixel centres, (x - 128) / 128) feeding the same pytorch-fid FID Inception weights; an
                 ADM reference batch's stored ``mu``/``sigma`` (``mu_s``/``sigma_s``) for FID/sFID -- those of the
                 whole training set -- and its ``arr_0`` images only for precision/recall; IS in splits of 5,000
                 samples (the last one smaller); precision/recall distances in float16, float32 for a 10,000 x 10,000
                 block where they are not finite. DiT's, SiT's and REPA's numbers.

The front end belongs to the FID Inception; the digits extractor (the quickstart's 8x8 stand-in) has no resize, so
under ``adm`` its features are those of ``pytorch_fid`` and only the statistics, IS and precision/recall rules
change.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusion.errors import ConfigError
from diffusion.evaluation.metrics import ADM_TILE, ArrayLike, inception_score, precision_recall


@dataclass(frozen=True)
class Protocol:
    """How a protocol measures: see the module docstring."""

    name: str
    front_end: str  # the FID Inception's: "pytorch_fid" | "adm" (diffusion.evaluation.inception.FRONT_ENDS)
    stored_statistics: bool  # an ADM reference batch's stored statistics for FID/sFID (else computed from arr_0)
    is_split_size: int  # 0: the Inception Score over 10 equal splits; else splits of this many samples
    distances: str  # precision/recall: "fp32" | "fp16" (ADM's DistanceBlock)

    def inception_score(self, logits: ArrayLike) -> tuple[float, float]:
        """(mean, std over the splits)."""
        return inception_score(logits, split_size=self.is_split_size)

    def precision_recall(self, reference: ArrayLike, samples: ArrayLike, device="cpu") -> tuple[float, float]:
        return precision_recall(reference, samples, device=device, distances=self.distances, tile=ADM_TILE)


PROTOCOLS = {
    "pytorch_fid": Protocol("pytorch_fid", "pytorch_fid", stored_statistics=False, is_split_size=0, distances="fp32"),
    "adm": Protocol("adm", "adm", stored_statistics=True, is_split_size=5000, distances="fp16"),
}
PROTOCOL_NAMES = tuple(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
    return PROTOCOLS[name]
