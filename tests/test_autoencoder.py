"""The SD-VAE wrapper, through the real loading paths, with a tiny randomly initialised AutoencoderKL on disk."""

import argparse
import math
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL

from diffusion.config.schema import base_config
from diffusion.errors import WeightsNotFoundError
from diffusion.pretrained.autoencoder import Autoencoder, sample_posterior
from tests.helpers import ldm_state_dict, make_tiny_autoencoder, write_ldm_single_file


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_autoencoder(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="module")
def folder_ae(vae_dir) -> Autoencoder:
    return Autoencoder.load(str(vae_dir), scale_factor=0.18215)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_folder_round_trip(vae_dir, folder_ae, images):
    ae = folder_ae
    assert (ae.latent_channels, ae.downsample, ae.latent_shape(32), ae.latent_shape(256)) == (4, 8, (4, 4, 4),
                                                                                           (4, 32, 32))
    assert not ae.vae.training and not any(p.requires_grad for p in ae.vae.parameters())
    moments = ae.encode_moments(images)
    assert moments.shape == (5, 8, 4, 4) and moments.dtype == torch.float32 and not moments.requires_grad
    reference = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        assert torch.equal(moments, reference.encode(images).latent_dist.parameters)
    with pytest.raises(ValueError, match="divisible"):
        ae.latent_shape(36)


def test_pipeline_folder_with_vae_subfolder(tmp_path, vae_dir, folder_ae, images):
    pipeline = tmp_path / "stable-diffusion"
    make_tiny_autoencoder(pipeline / "vae")
    ae = Autoencoder.load(str(pipeline), scale_factor=0.18215)
    assert torch.equal(ae.encode_moments(images), folder_ae.encode_moments(images))


@pytest.mark.parametrize("name, prefix", [("autoencoder_kl.pth", ""), ("sd-v1.ckpt", "first_stage_model."),
                                          ("sd-v1.safetensors", "first_stage_model.")])
def test_single_original_file_matches_folder(tmp_path, vae_dir, folder_ae, images, name, prefix):
    path = write_ldm_single_file(vae_dir, tmp_path / name, prefix=prefix)
    ae = Autoencoder.load(str(path), scale_factor=0.18215, single_file_config=str(vae_dir))
    assert torch.equal(ae.encode_moments(images), folder_ae.encode_moments(images))
    latents = folder_ae.encode(images)
    assert torch.equal(ae.decode(latents), folder_ae.decode(latents))


def test_ldm_layout_is_the_original_one(vae_dir):
    """The helper's reverse mapping writes the key names U-ViT's autoencoder_kl.pth has (not diffusers')."""
    keys = set(ldm_state_dict(vae_dir))
    for key in ["encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.mid.block_1.conv1.weight",
                "encoder.mid.attn_1.q.weight",
                "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "decoder.up.0.block.1.conv2.weight",
                "decoder.mid.block_2.norm2.bias", "decoder.mid.attn_1.proj_out.weight"]:
        assert key in keys, key
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)


def test_single_file_default_architecture_is_sd_kl_f8(tmp_path, vae_dir):
    """Without single_file_config the architecture is SD's (128..512 channels), built in: no hub access needed.
    The tiny file does not fit it, and the error says so and names the file."""
    path = write_ldm_single_file(vae_dir, tmp_path / "autoencoder_kl.pth")
    with pytest.raises(ValueError, match=r"autoencoder_kl\.pth.*SD KL-f8.*128, 3, 3, 3") as info:
        Autoencoder.load(str(path), scale_factor=0.18215)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_incomplete_or_foreign_single_file_is_refused(tmp_path, vae_dir):
    state = {k: v for k, v in ldm_state_dict(vae_dir).items() if not k.startswith("decoder.up.0.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth is not a complete autoencoder.*weights are missing"):
        Autoencoder.load(str(tmp_path / "partial.pth"), scale_factor=1.0, single_file_config=str(vae_dir))
    torch.save({"pos_embed": torch.zeros(1, 4, 8), "x_embedder.proj.weight": torch.zeros(8, 4, 2, 2)},
               tmp_path / "DiT-XL-2-256x256.pt")
    with pytest.raises(ValueError, match=r"DiT-XL-2-256x256\.pt does not hold autoencoder weights"):
        Autoencoder.load(str(tmp_path / "DiT-XL-2-256x256.pt"), scale_factor=1.0, single_file_config=str(vae_dir))


def test_missing_single_file_config_folder(tmp_path, vae_dir):
    path = write_ldm_single_file(vae_dir, tmp_path / "autoencoder_kl.pth")
    with pytest.raises(WeightsNotFoundError, match=r"single_file_config 'assets/no/such-vae'.*autoencoder_kl\.pth"):
        Autoencoder.load(str(path), scale_factor=0.18215, single_file_config="assets/no/such-vae")


def test_single_file_is_read_without_unpickling_objects(tmp_path, vae_dir):
    """Original files are read with weights_only=True: a checkpoint that pickles a Namespace is refused clearly."""
    torch.save({"state_dict": ldm_state_dict(vae_dir), "args": argparse.Namespace(lr=1.0)}, tmp_path / "train.ckpt")
    with pytest.raises(ValueError, match=r"train\.ckpt.*weights_only=True"):
        Autoencoder.load(str(tmp_path / "train.ckpt"), scale_factor=1.0, single_file_config=str(vae_dir))


# ----------------------------------------------------------------------------------------------------------------
# Encode / decode
# ----------------------------------------------------------------------------------------------------------------
def test_latents_scale_with_scale_factor(vae_dir, folder_ae, images):
    noise = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    coco = Autoencoder.load(str(vae_dir), scale_factor=0.23010)
    z_imagenet, z_coco = folder_ae.encode(images, noise), coco.encode(images, noise)
    torch.testing.assert_close(z_coco, z_imagenet * (0.23010 / 0.18215))
    # Each decodes its own scaled latents to the same images: decode divides by its own scale.
    torch.testing.assert_close(coco.decode(z_coco), folder_ae.decode(z_imagenet), atol=1e-5, rtol=0)


def test_decode_of_encoded_mean_is_the_vae_decoder(folder_ae, images):
    moments = folder_ae.encode_moments(images)
    mean = moments[:, :4]
    latents = folder_ae.encode(images, noise=torch.zeros_like(mean))
    torch.testing.assert_close(latents, 0.18215 * mean, atol=0, rtol=0)
    with torch.no_grad():
        direct = folder_ae.vae.decode(mean).sample
    decoded = folder_ae.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, direct.clamp(-1, 1), atol=1e-5, rtol=0)
    assert decoded.std() > 0.05  # the tiny decoder's output is not constant, so the comparison means something


def test_decode_clamps_to_image_range(folder_ae):
    decoded = folder_ae.decode(torch.randn(2, 4, 4, 4) * 50)
    assert decoded.min() >= -1 and decoded.max() <= 1 and (decoded.abs() == 1).any()


def test_chunking_does_not_change_results(vae_dir, images):
    one = Autoencoder.load(str(vae_dir), scale_factor=0.18215, chunk_size=1)
    many = Autoencoder.load(str(vae_dir), scale_factor=0.18215, chunk_size=16)
    # Equal up to fp32 round-off: CPU convolution kernels sum in a batch-size-dependent order (~3e-6 here).
    torch.testing.assert_close(one.encode_moments(images), many.encode_moments(images), atol=1e-5, rtol=0)
    latents = many.encode(images, noise=torch.zeros(5, 4, 4, 4))
    torch.testing.assert_close(one.decode(latents), many.decode(latents), atol=1e-5, rtol=0)


def test_from_config_section(vae_dir):
    config = base_config().autoencoder
    config.update(pretrained=str(vae_dir), scale_factor=0.23010, chunk_size=3, dtype="bf16")
    ae = Autoencoder.from_config(config)
    assert (ae.scale_factor, ae.chunk_size, ae.dtype, ae.device) == (0.23010, 3, torch.bfloat16, torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["bf16", torch.float16])
def test_half_precision_vae_returns_float32(vae_dir, folder_ae, images, dtype):
    ae = Autoencoder.load(str(vae_dir), scale_factor=0.18215, dtype=dtype)
    assert all(p.dtype == ae.dtype != torch.float32 for p in ae.vae.parameters())
    moments = ae.encode_moments(images)
    assert moments.dtype == torch.float32
    reference = folder_ae.encode_moments(images)
    assert (moments - reference).abs().max() < 0.05 * reference.abs().max()
    assert ae.decode(folder_ae.encode(images)).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        Autoencoder.load(str(vae_dir), scale_factor=0.18215, dtype="fp8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_fp16_returns_on_input_device(vae_dir, folder_ae, images):
    ae = Autoencoder.load(str(vae_dir), scale_factor=0.18215, dtype="fp16", device="cuda")
    moments = ae.encode_moments(images)  # CPU images: the result comes back to the CPU
    assert moments.device.type == "cpu" and moments.dtype == torch.float32
    assert ae.decode(folder_ae.encode(images).cuda()).device.type == "cuda"
    assert (moments - folder_ae.encode_moments(images)).abs().max() < 0.01


# ----------------------------------------------------------------------------------------------------------------
# Posterior sampling
# ----------------------------------------------------------------------------------------------------------------
def test_sample_posterior_exact_formula_with_logvar_clamp():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([math.log(0.25), 0.0, 50.0, -100.0]).view(1, 4, 1, 1)
    noise = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    out = sample_posterior(torch.cat([mean, logvar], dim=1), 0.5, noise)
    expected = 0.5 * torch.tensor([0.5 + 0.5 * 1.0, -1.0 - 2.0, 2.0 + math.exp(10.0) * 0.5, 0.0 + math.exp(-15.0) * 3])
    torch.testing.assert_close(out.flatten(), expected)


def test_sample_posterior_statistics():
    mean, std, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]), 0.18215
    moments = torch.cat([mean, 2 * std.log()]).view(1, 4, 1, 1).expand(40000, 4, 1, 1)
    torch.manual_seed(0)
    draws = sample_posterior(moments, scale).squeeze()
    torch.testing.assert_close(draws.mean(0), scale * mean, atol=scale * 0.03, rtol=0)
    torch.testing.assert_close(draws.std(0), scale * std, atol=0, rtol=0.02)
    assert not torch.equal(draws, sample_posterior(moments, scale).squeeze())  # fresh noise every call


# ----------------------------------------------------------------------------------------------------------------
# Missing weights: one clear error, raised here rather than deep inside diffusers
# ----------------------------------------------------------------------------------------------------------------
def _assert_clear(info, *needles):
    message = str(info.value)
    for needle in (*needles, "--config.autoencoder.pretrained", "huggingface-cli download stabilityai/sd-vae-ft-ema"):
        assert needle in message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert Path(info.traceback[-1].path).name == "autoencoder.py"


@pytest.mark.parametrize("missing", ["/nonexistent/assets/stable-diffusion/autoencoder_kl_ema.pth",
                                     "assets/missing/sd-vae-ft-ema", "./sd-vae-ft-ema"])
def test_missing_local_weights_name_the_path_and_the_fix(missing):
    with pytest.raises(WeightsNotFoundError) as info:
        Autoencoder.load(missing, scale_factor=0.18215)
    assert isinstance(info.value, FileNotFoundError)
    _assert_clear(info, missing)


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(WeightsNotFoundError) as info:
        Autoencoder.load("nobody-here/no-such-vae", scale_factor=0.18215)
    _assert_clear(info, "nobody-here/no-such-vae", "Hugging Face Hub")


def test_empty_pretrained_is_refused():
    with pytest.raises(ValueError, match="autoencoder.pretrained is empty"):
        Autoencoder.from_config(base_config().autoencoder)
