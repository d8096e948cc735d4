"""FD-DINOv2 (diffusion/evaluation/fd_dinov2.py, ``eval_fid.py --metrics fd_dinov2``): EDM2's preprocessing and
features checked against references written here with torch/PIL/timm ops, on a tiny random DINOv2 saved in
torch.hub's layout with the released 37 x 37 position grid (as tests/test_vision_encoders.py makes them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_fid
from diffusion.evaluation import build_feature_extractor, frechet_distance, statistics
from diffusion.evaluation.fd_dinov2 import DINOv2Features
from tests.test_vision_encoders import spread_, to_hub

pytestmark = pytest.mark.filterwarnings("ignore::diffusion.pretrained.vision_encoders.EncoderSizeWarning")

EDM2_MEAN, EDM2_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # calculate_metrics.py's constants


@pytest.fixture(autouse=True)
def private_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))


def tiny_dinov2(seed: int = 0, img_size: int = 518):
    """A tiny timm DINOv2 (64 wide: one 64-wide head) with random weights in which every layer matters."""
    import timm

    torch.manual_seed(seed)  # timm's initialisation, then the seeded spread: the same weights for a seed
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0,
                              depth=2, embed_dim=64, num_heads=1)
    return spread_(model, seed).eval()


def save_hub_file(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_hub(tiny_dinov2(seed).state_dict(), swiglu=False), path)
    return path


@pytest.fixture
def weights(tmp_path) -> Path:
    return save_hub_file(tmp_path / "weights" / "dinov2_vitl14_pretrain.pth")


def smooth_images(n: int, side: int, seed: int) -> np.ndarray:
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=(side, side), mode="bilinear") * 255).round().byte() \
        .permute(0, 2, 3, 1).numpy()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = eval_fid.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def direct_fd(extractor, a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = extractor(a)["pool"].double().numpy(), extractor(b)["pool"].double().numpy()
    return frechet_distance(*statistics(fa), *statistics(fb))


def test_preprocessing_is_edm2s(weights) -> None:
    """EDM2's resize_mode='torch' recipe exactly; its PIL reference (resize_mode='pil') within rounding."""
    network = DINOv2Features(str(weights))  # the network itself: its preprocessing
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    ours = network.prepare(images)
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic", antialias=True)
    expected = (x / 255 - torch.tensor(EDM2_MEAN).view(1, 3, 1, 1)) / torch.tensor(EDM2_STD).view(1, 3, 1, 1)
    assert ours.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0)
    smooth = smooth_images(2, 256, seed=3)  # PIL clamps to uint8 between its two passes: smooth images, no overshoot
    ours = network.prepare(torch.from_numpy(smooth))
    pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.Resampling.BICUBIC)) for im in smooth])
    pixels = (ours * torch.tensor(EDM2_STD).view(1, 3, 1, 1) + torch.tensor(EDM2_MEAN).view(1, 3, 1, 1)) * 255
    levels = (pixels - torch.from_numpy(pil).permute(0, 3, 1, 2).float()).abs()  # in uint8 levels
    assert levels.max() < 1.5 and levels.mean() < 0.4  # "almost the same results" (EDM2): PIL's rounding
    grey = network.prepare(images[..., :1])
    assert torch.allclose(grey, network.prepare(images[..., :1].expand(-1, -1, -1, 3)))


def test_features_are_the_hub_models_class_token(weights) -> None:
    """The final-norm class token of the hub model at 224 px: its 37 x 37 table interpolated in the forward with
    bicubic, no antialias, scale factor 16.1 / 37 (facebookresearch/dinov2), rebuilt here from timm's own model."""
    released = tiny_dinov2(seed=0)
    pos = released.pos_embed.detach()
    grid = F.interpolate(pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37),
                         mode="bicubic", antialias=False)
    reference = tiny_dinov2(seed=0, img_size=224)
    state = released.state_dict()
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    reference.load_state_dict(state)
    images = smooth_images(3, 32, seed=4)
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic",
                      antialias=True)
    x = (x / 255 - torch.tensor(EDM2_MEAN).view(1, 3, 1, 1)) / torch.tensor(EDM2_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 0]  # timm's forward_features ends with the final norm
    ours = build_feature_extractor("dinov2", weights=str(weights))(images)
    assert set(ours) == {"pool"} and ours["pool"].shape == (3, 64)
    assert torch.allclose(ours["pool"], expected, atol=1e-5, rtol=1e-5)
    repa = F.interpolate(pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                         antialias=True)  # REPA's resampling: another table, other features
    assert not torch.allclose(grid, repa, atol=1e-3)


def test_eval_fid_fd_dinov2_equals_direct_and_with_fid(weights, tmp_path, capsys) -> None:
    """eval_fid's fd_dinov2 = the Frechet distance of the extractor's features, against reference images and
    against a statistics file from --save_stats --extractor dinov2, and beside fid (each with its own extractor)."""
    samples, reference = smooth_images(80, 8, seed=1), smooth_images(70, 8, seed=2)  # 8 px: digits' size too
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=np.zeros(2048), sigma=np.eye(2048))  # stored: Inception's
    flags = ["--dinov2", weights, "--num_workers", "0", "--batch_size", "32", "--device", "cpu"]
    expected = direct_fd(build_feature_extractor("dinov2", weights=str(weights)), samples, reference)
    assert expected > 0
    code, out, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "ref.npz", "--metrics", "fd_dinov2",
                             "--protocol", "adm", "--json", tmp_path / "a.json", *flags)
    assert code == 0, err
    scores = json.loads((tmp_path / "a.json").read_text())
    assert scores["fd_dinov2"] == pytest.approx(expected, rel=1e-4) and "fid" not in scores
    assert scores["extractor"].startswith("dinov2-") and "FD-DINOv2" in out
    code, out, err = run_cli(capsys, "--save_stats", tmp_path / "dino_stats.npz", tmp_path / "ref.npz",
                             "--extractor", "dinov2", *flags)
    assert code == 0, err
    assert np.load(tmp_path / "dino_stats.npz")["mu"].shape == (64,)
    code, out, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "dino_stats.npz", "--metrics",
                             "fd_dinov2", "--json", tmp_path / "b.json", *flags)
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["fd_dinov2"] == pytest.approx(expected, rel=1e-4)
    code, out, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "ref.npz", "--metrics", "fid,fd_dinov2",
                             "--extractor", "digits", "--json", tmp_path / "c.json", *flags)
    assert code == 0, err
    both = json.loads((tmp_path / "c.json").read_text())
    digits = build_feature_extractor("digits")
    assert both["fd_dinov2"] == pytest.approx(expected, rel=1e-4)
    assert both["fid"] == pytest.approx(direct_fd(digits, samples, reference), rel=1e-4)
    assert both["extractor"] == digits.id and both["fd_dinov2_extractor"] == scores["extractor"]


def test_feature_cache_keyed_by_extractor_and_reused(weights, tmp_path, capsys) -> None:
    samples, reference = smooth_images(20, 16, seed=1), smooth_images(20, 16, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=reference)
    flags = ["--metrics", "fd_dinov2", "--num_workers", "0", "--device", "cpu"]
    extractor = build_feature_extractor("dinov2", weights=str(weights))
    code, out, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "ref.npz", "--dinov2", weights, *flags)
    assert code == 0 and "(cached features)" not in out, err
    cache = tmp_path / f"samples.features-{extractor.id}.npz"
    with np.load(cache) as data:
        assert str(data["_extractor"]) == extractor.id
        assert np.allclose(data["pool"], extractor(samples)["pool"].numpy(), atol=1e-6)
    code, out2, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "ref.npz", "--dinov2", weights, *flags)
    assert code == 0 and "(cached features)" in out2 and "cached statistics" in out2, err
    assert out2.split()[1] == out.split()[1]  # the same score
    other = save_hub_file(tmp_path / "other" / "dinov2_vitl14_pretrain.pth", seed=1)
    other_id = build_feature_extractor("dinov2", weights=str(other)).id
    assert other_id != extractor.id and other_id.startswith("dinov2-")
    code, out3, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "ref.npz", "--dinov2", other, *flags)
    assert code == 0 and "(cached features)" not in out3, err
    assert (tmp_path / f"samples.features-{other_id}.npz").is_file() and cache.is_file()


def test_missing_or_mismatched_dinov2_is_one_error(tmp_path, capsys) -> None:
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(4, 16, seed=1))
    np.savez(tmp_path / "inception_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code, out, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "inception_stats.npz", "--metrics",
                             "fd_dinov2", "--dinov2", tmp_path / "nope" / "dinov2_vitl14_pretrain.pth")
    assert code == 2 and "dinov2-vit-l weights not found" in err and "Traceback" not in err, err
    weights = save_hub_file(tmp_path / "w.pth")
    code, out, err = run_cli(capsys, tmp_path / "samples.npz", tmp_path / "inception_stats.npz", "--metrics",
                             "fd_dinov2", "--dinov2", weights, "--device", "cpu")
    assert code == 2 and "2048-d" in err and "Traceback" not in err, err


def test_transformers_folder_gives_the_same_features(tmp_path) -> None:
    """A transformers Dinov2Model folder and the same weights in torch.hub's layout: one set of features."""
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    from tests.test_vision_encoders import hf_to_hub

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=256,
                          image_size=518, patch_size=14)
    spread_(Dinov2Model(config), seed=1).save_pretrained(tmp_path / "hf")
    torch.save(hf_to_hub(load_file(tmp_path / "hf" / "model.safetensors")), tmp_path / "hub.pth")
    images = smooth_images(2, 32, seed=5)
    via_hf, via_timm = (build_feature_extractor("dinov2", weights=str(tmp_path / name)) for name in ("hf", "hub.pth"))
    assert via_hf.network.encoder.backend == "transformers"
    assert via_hf.id.startswith("dinov2-") and via_hf.id != via_timm.id
    torch.testing.assert_close(via_hf(images)["pool"], via_timm(images)["pool"], rtol=1e-5, atol=2e-5)
