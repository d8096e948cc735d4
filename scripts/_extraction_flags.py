"""The command-line flags that scripts/extract_latents.py and scripts/extract_coco.py share (the extraction folder,
the autoencoder, REPA's encoders, sharding and workers); each script adds its own source flags."""

from diffusion.config.cli import Flag
from diffusion.config.schema import ON_CORRUPT
from diffusion.pretrained.autoencoder import DTYPES


def extraction_flags(scale_factor: float) -> tuple[Flag, ...]:
    """The flags both extraction commands share; their names are keyword arguments of
    :func:`~diffusion.data.extraction.extract_imagefolder` and :func:`~diffusion.data.extraction.extract_coco`."""
    return (
        Flag("out", required=True, metavar="DIR", help="extraction folder (rerun the same command to resume)"),
        Flag("resolution", 256, int, help="pixel resolution the images are encoded at"),
        Flag("autoencoder", required=True, metavar="PATH", help="hub id, diffusers folder or original single file"),
        Flag("single_file_config", "", help="architecture of a single-file autoencoder"),
        Flag("scale_factor", scale_factor, float,
             help="recorded in the manifest; the training config's autoencoder.scale_factor wins"),
        Flag("autoencoder_dtype", "fp32", choices=tuple(DTYPES), help="dtype the encoder runs in"),
        Flag("fp16", False, bool, help="store features as float16 (half the disk)"),
        Flag("repa_encoders", "", metavar="NAMES",
             help="also store these REPA encoders' features (comma-separated, as repa.encoders, e.g. dinov2-vit-b)"),
        Flag("repa_encoder_weights", "", metavar="PATHS",
             help="their weights, one per encoder (comma-separated; empty: the local caches), as repa.encoder_weights"),
        Flag("repa_fp16", False, bool, help="store the REPA features as float16 (half the disk, rounded targets)"),
        Flag("batch_size", 32, int, help="images per encoder call"),
        Flag("shard_size", 1024, int, help="images per shard file"),
        Flag("num_workers", 4, int, help="image-decoding workers per process"),
        Flag("on_corrupt", "skip", choices=ON_CORRUPT,
             help="unreadable images: skip and count them, or stop with an error naming the file"),
    )
