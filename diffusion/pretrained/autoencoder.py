"""The Stable Diffusion KL-f8 autoencoder that latent U-ViT and DiT models live in (diffusers ``AutoencoderKL``).

Both papers train on *scaled* posterior samples ``scale_factor * z`` (0.18215 for ImageNet, 0.23010 for U-ViT's
MS-COCO models) and decode ``latents / scale_factor``. ImageNet latents are cached as encoder *moments*
``[mean | logvar]`` (8 channels) and a fresh posterior sample is drawn at every training step
(:func:`sample_posterior`), as in U-ViT.

Weights come from a hub id (``stabilityai/sd-vae-ft-ema``, ``stabilityai/sd-vae-ft-mse``), a local diffusers folder
(or a pipeline folder with a ``vae/`` subfolder), or one original-format file in the latent-diffusion key layout:
U-ViT's ``autoencoder_kl.pth`` / ``autoencoder_kl_ema.pth`` (plain state_dicts), or a full Stable Diffusion
checkpoint whose keys start with ``first_stage_model.``. Single files go through diffusers' own conversion
(``AutoencoderKL.from_single_file``, which reads ``.pth/.pt/.ckpt`` with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from diffusion.errors import CheckpointError, ConfigError, WeightsNotFoundError

SD_VAE_HUB_ID = "stabilityai/sd-vae-ft-ema"
SINGLE_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The KL-f8 autoencoder of latent diffusion / Stable Diffusion / U-ViT (``first_stage_config`` of the LDM yaml), so
# that a single original-format file loads without fetching an architecture from the hub.
SD_KL_F8_ORIGINAL_CONFIG = {
    "model": {
        "params": {
            "first_stage_config": {
                "params": {
                    "embed_dim": 4,
                    "ddconfig": dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                                     ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0),
                }
            }
        }
    }
}

HOW_TO_GET_VAE = (
    "Provide the Stable Diffusion VAE in one of these ways and point --config.autoencoder.pretrained at it:\n"
    "  * a diffusers folder: `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir assets/sd-vae-ft-ema` "
    "(or sd-vae-ft-mse), then --config.autoencoder.pretrained=assets/sd-vae-ft-ema\n"
    "  * U-ViT's original file: download autoencoder_kl_ema.pth (or autoencoder_kl.pth) from the U-ViT release "
    "(see its README), then --config.autoencoder.pretrained=assets/stable-diffusion/autoencoder_kl_ema.pth\n"
    "  * a hub id (needs network, or the file already in the Hugging Face cache)."
)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)} (or a torch.dtype)")
    return DTYPES[dtype]


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` and nothing that only a local path would have; a missing local path must not go to the hub."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not name.endswith(SINGLE_FILE_SUFFIXES) and "\\" not in name)


def _error_summary(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------------------------------------------
# Posterior sampling (pure tensor math: cached-moment datasets use it without a VAE)
# ----------------------------------------------------------------------------------------------------------------
def sample_posterior(moments: Tensor, scale_factor: float, noise: Tensor | None = None) -> Tensor:
    """(B, 2C, h, w) moments ``[mean | logvar]`` -> ``scale_factor * (mean + std * noise)``, a fresh N(0, 1) draw when
    ``noise`` is None. logvar is clamped to [-30, 20] as in latent diffusion (and diffusers' posterior)."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if noise is None:
        noise = torch.randn_like(mean)
    return scale_factor * (mean + std * noise)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _load_folder_or_hub(pretrained: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    folder = Path(pretrained).expanduser()
    subfolder = "vae" if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "vae").is_dir() \
        else None
    try:
        dtype_kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        return AutoencoderKL.from_pretrained(str(folder) if folder.is_dir() else pretrained, subfolder=subfolder,
                                             **dtype_kwargs)
    except OSError as error:  # diffusers/huggingface_hub report missing files and no network as OSError
        where = "local folder" if folder.is_dir() else "Hugging Face Hub id"
        raise WeightsNotFoundError(f"could not load the autoencoder from the {where} {pretrained!r} "
                                   f"({_error_summary(error)}).\n{HOW_TO_GET_VAE}") from None


def _load_single_file(path: Path, single_file_config: str, dtype: torch.dtype):
    """Original latent-diffusion layout -> diffusers, by diffusers' own reader and converter. The architecture comes
    from ``single_file_config`` (a diffusers folder or hub id, or an LDM ``.yaml``); empty means SD's KL-f8."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import SingleFileComponentError, load_single_file_checkpoint

    try:  # read first, so that a bad file and an unreachable architecture get different messages
        checkpoint = load_single_file_checkpoint(str(path))
    except OSError as error:
        cause = error.__context__ or error
        raise CheckpointError(f"could not read the autoencoder file {str(path)!r} ({_error_summary(cause)}). "
                              ".pth/.pt/.ckpt files are read with torch.load(weights_only=True): a checkpoint that "
                              "pickles other objects must be re-saved as a plain state_dict (or .safetensors)."
                              ) from None
    config_dir = Path(single_file_config).expanduser()
    if not single_file_config:
        arch = {"original_config": SD_KL_F8_ORIGINAL_CONFIG}
    elif single_file_config.endswith((".yaml", ".yml")):
        arch = {"original_config": single_file_config}
    elif config_dir.is_dir() or looks_like_hub_id(single_file_config):
        arch = {"config": str(config_dir) if config_dir.is_dir() else single_file_config}
    else:
        raise WeightsNotFoundError(f"single_file_config {single_file_config!r} (the architecture for {str(path)!r}) "
                                   "is neither a folder, an LDM .yaml, nor a Hugging Face Hub id; leave it empty for "
                                   "the SD VAE.")
    arch_name = single_file_config or "the SD KL-f8 autoencoder (built in)"
    # torch_dtype only when it changes something: diffusers warns on every cast of a loaded model.
    dtype_kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    try:
        vae = AutoencoderKL.from_single_file(checkpoint, **arch, **dtype_kwargs)
    except OSError as error:
        raise WeightsNotFoundError(f"could not load the architecture {arch_name!r} for {str(path)!r} "
                                   f"({_error_summary(error)}). single_file_config must be a local diffusers folder "
                                   "(with config.json), an LDM .yaml, or a hub id reachable from here; leave it empty "
                                   "for the SD VAE.") from None
    except NotImplementedError:  # diffusers leaves weights the file lacks on the meta device, then fails to move them
        raise CheckpointError(f"{path} is not a complete autoencoder for {arch_name}: some weights are missing. "
                              "Expected the latent-diffusion key layout: encoder.down.0.block.0.norm1.weight, ..., "
                              "quant_conv.*, post_quant_conv.*, decoder.* (optionally under first_stage_model.)"
                              ) from None
    except (ValueError, SingleFileComponentError) as error:
        raise CheckpointError(f"{path} does not hold autoencoder weights for {arch_name} in the latent-diffusion key "
                              f"layout ({_error_summary(error)})") from None
    return vae


def load_autoencoder_kl(pretrained: str, single_file_config: str = "", dtype: str | torch.dtype = "fp32"):
    """-> a diffusers ``AutoencoderKL`` on the CPU, from a hub id, a folder or a single original file. The dtype is
    applied while loading (diffusers warns about casting a loaded model with ``.to(dtype)``)."""
    dtype = resolve_dtype(dtype)
    if not pretrained:
        raise ConfigError("no autoencoder given (autoencoder.pretrained is empty).\n" + HOW_TO_GET_VAE)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return _load_single_file(path, single_file_config, dtype)
    if path.is_dir() or looks_like_hub_id(pretrained):
        return _load_folder_or_hub(pretrained, dtype)
    raise WeightsNotFoundError(f"autoencoder weights not found: no file or folder {pretrained!r} (and it is not a "
                               f"Hugging Face Hub id).\n{HOW_TO_GET_VAE}")


# ----------------------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------------------
class Autoencoder:
    """A frozen ``AutoencoderKL`` plus the latent scale: images in [-1, 1] <-> scaled latents, chunked, no grad."""

    def __init__(self, vae, *, scale_factor: float, dtype: str | torch.dtype = "fp32", device="cpu",
                 chunk_size: int = 16):
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        if vae.dtype != self.dtype:
            vae = vae.to(dtype=self.dtype)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.chunk_size = int(chunk_size)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, pretrained: str, *, scale_factor: float, single_file_config: str = "",
             dtype: str | torch.dtype = "fp32", device="cpu", chunk_size: int = 16) -> Autoencoder:
        vae = load_autoencoder_kl(pretrained, single_file_config, dtype)
        return cls(vae, scale_factor=scale_factor, dtype=dtype, device=device, chunk_size=chunk_size)

    @classmethod
    def from_config(cls, config, device="cpu") -> Autoencoder:
        """``config``: the ``autoencoder`` section (pretrained, single_file_config, scale_factor, dtype, chunk_size)."""
        return cls.load(config.pretrained, scale_factor=config.scale_factor,
                        single_file_config=config.get("single_file_config", ""), dtype=config.get("dtype", "fp32"),
                        device=device, chunk_size=config.get("chunk_size", 16))

    def encoder_digest(self, dtype: str | torch.dtype | None = None) -> str:
        """sha256 of the weights the latents depend on: the ``encoder`` and ``quant_conv`` state (names, shapes and
        values in ``dtype``, default the loaded dtype), whatever file format they came from. Two autoencoders with
        the same digest encode the same moments, whatever their decoders (U-ViT's ``autoencoder_kl.pth`` and
        ``autoencoder_kl_ema.pth``: only the decoder was fine-tuned)."""
        dtype = self.dtype if dtype is None else resolve_dtype(dtype)
        digest = hashlib.sha256()
        for prefix in ("encoder", "quant_conv"):
            module = getattr(self.vae, prefix, None)
            for name, tensor in sorted(module.state_dict().items() if module is not None else ()):
                values = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
                digest.update(f"{prefix}.{name} {tuple(tensor.shape)} {values.dtype}\n".encode())
                digest.update(values.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ConfigError(f"image size {image_size} is not divisible by the autoencoder's downsampling "
                              f"factor {self.downsample}")
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def _chunked(self, fn, x: Tensor) -> Tensor:
        """Apply ``fn`` chunk by chunk on the VAE's device and dtype; float32 results on ``x``'s device."""
        outs = [fn(chunk.to(self.device, self.dtype)).float().to(x.device) for chunk in x.split(self.chunk_size)]
        return torch.cat(outs)

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 2C, H/8, W/8) float32 posterior moments ``[mean | logvar]``
        (unclamped, as the encoder's ``quant_conv`` outputs them): what latent caches store."""
        return self._chunked(lambda x: self.vae.encode(x).latent_dist.parameters, images)

    @torch.no_grad()
    def encode(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Images -> ``scale_factor * z`` with z a posterior sample: the diffusion model's training input."""
        return sample_posterior(self.encode_moments(images), self.scale_factor, noise)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> float32 images clamped to [-1, 1] (so uint8 conversion never wraps around)."""
        return self._chunked(lambda z: self.vae.decode(z / self.scale_factor).sample, latents).clamp_(-1.0, 1.0)
