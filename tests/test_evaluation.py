"""Evaluation: the metrics against closed forms and pytorch-fid, the FID Inception against pytorch-fid's own
network (random weights, loaded through pytorch-fid's download cache), the digits extractor, and eval_fid.py end to
end on real files: .npz samples (stored and compressed), image folders, statistics files, ADM batches, dataset
configs, MS-COCO, feature caches and a two-process launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy.ndimage import gaussian_filter

import eval_fid
from diffusion.config.loading import load_config
from diffusion.data.datasets import center_crop_arr
from diffusion.errors import ConfigError, InceptionWeightsNotFoundError
from diffusion.evaluation import (
    RunningStatistics,
    build_feature_extractor,
    frechet_distance,
    generated_statistics,
    inception_score,
    precision_recall,
    read_statistics,
    reference_statistics_for_config,
    statistics,
)
from diffusion.evaluation import digits as digits_module
from diffusion.evaluation.digits import real_digits_uint8
from diffusion.evaluation.inception import WEIGHTS_FILE, load_fid_inception
from diffusion.evaluation.sources import NpzImages
from tests.helpers import DIGITS_EXTRACTOR as DIGITS
from tests.helpers import REPO, make_random_fid_inception

pytestmark = pytest.mark.usefixtures("private_caches")


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = eval_fid.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _smooth_images(n: int, side: int, seed: int) -> np.ndarray:
    """uint8 (n, side, side, 3) images of upsampled noise: different images give different features."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear") * 255).round().byte() \
        .permute(0, 2, 3, 1).numpy()


def _write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{i:04d}.png")
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Frechet distance, statistics


def _random_covariance(rng, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    sigma = _random_covariance(rng, 16)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)  # diagonal: sum (sqrt a - sqrt b)^2 per dimension
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.tensor(mu1), torch.tensor(sigma), mu1, sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_agrees_with_pytorch_fid() -> None:
    rng = np.random.default_rng(1)
    full = [(rng.standard_normal(32), _random_covariance(rng, 32)) for _ in range(2)]
    # fewer samples than dimensions: singular covariances, the eps * I fallback of both implementations
    singular = [statistics(rng.standard_normal((10, 64)) + shift) for shift in (0.0, 0.3)]
    for (mu1, s1), (mu2, s2) in (full, singular):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm's disp=, which pytorch-fid passes
            expected = calculate_frechet_distance(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7, abs=1e-9)
    x = rng.standard_normal((10, 64))
    assert frechet_distance(*statistics(x), *statistics(x)) == pytest.approx(0, abs=1e-3)  # eps * trace terms


def test_frechet_distance_refuses_bad_statistics() -> None:
    with pytest.raises(ValueError, match="different feature spaces"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="imaginary part"):  # sqrt(-I) = i I: not covariances
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))


def test_statistics_and_running_statistics() -> None:
    x = np.random.default_rng(2).standard_normal((50, 6)) * 3 + 5
    mu, sigma = statistics(torch.tensor(x, dtype=torch.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5)
    running = RunningStatistics(6)
    for start in range(0, 50, 7):
        running.update(x[start:start + 7])
    running.all_reduce()  # a no-op without torch.distributed
    mu_r, sigma_r = running.compute()
    np.testing.assert_allclose(mu_r, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma_r, np.cov(x, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        statistics(x[:1])
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        running.update(np.zeros((2, 5)))


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score, precision/recall


def test_inception_score_of_known_predictions() -> None:
    assert inception_score(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0))
    k = 5
    labels = np.arange(100) % k  # every split of 10 holds each class twice
    confident = 50.0 * np.eye(k)[labels]
    score, std = inception_score(confident)
    assert score == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # ADM's formula (softmax, then 5,000-sample splits: N / 10 here) on random logits
    logits = np.random.default_rng(3).standard_normal((200, 10)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    adm = [np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1)))
           for part in np.split(p, 10)]
    assert inception_score(torch.tensor(logits))[0] == pytest.approx(np.mean(adm), rel=1e-9)
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(np.zeros((9, 3)))


def _brute_force_pr(ref: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    def sq(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    ref_radii, gen_radii = np.sort(sq(ref, ref), 1)[:, k], np.sort(sq(gen, gen), 1)[:, k]
    precision = (sq(gen, ref) <= ref_radii[None]).any(1).mean()
    recall = (sq(ref, gen) <= gen_radii[None]).any(1).mean()
    return precision, recall


def test_precision_recall_of_known_point_sets() -> None:
    # Reference 0..9 on a line: 3rd-neighbour radii 3 at the ends, 2 inside. Samples: 0.5..4.5 (inside the reference
    # manifold, radii 3/2/2/2/3: they cover reference points 0..7) and 50..54 (far away).
    ref = np.stack([np.arange(10.0), np.zeros(10)], 1)
    gen = np.stack([np.r_[np.arange(5) + 0.5, np.arange(50.0, 55.0)], np.zeros(10)], 1)
    assert precision_recall(ref, gen) == pytest.approx((0.5, 0.8))
    assert precision_recall(gen, ref) == pytest.approx((0.8, 0.5))
    rng = np.random.default_rng(4)
    ref, gen = rng.standard_normal((60, 8)), rng.standard_normal((45, 8)) * 1.3 + 0.4
    expected = _brute_force_pr(ref, gen)
    assert precision_recall(ref, gen) == pytest.approx(expected)
    assert precision_recall(ref, gen, max_elements=100) == pytest.approx(expected)  # many small row blocks
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(ref[:3], gen)


# ----------------------------------------------------------------------------------------------------------------------
# Digits extractor


def test_digits_extractor_sanity() -> None:
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-time optimizer import is not the fit's cost
    digits_module._fitted_state.cache_clear()
    start = time.perf_counter()
    extractor = build_feature_extractor("digits")
    assert time.perf_counter() - start < 2.0
    assert build_feature_extractor("digits").id == extractor.id
    real, labels = real_digits_uint8()
    features = extractor(np.repeat(real, 3, axis=-1))  # RGB copies of grey digits read the same
    assert set(features) == {"pool", "logits"} and features["pool"].shape == (1797, 64)
    torch.testing.assert_close(features["pool"], extractor(real)["pool"])
    assert (features["logits"].argmax(1).numpy() == labels).mean() > 0.99
    ref = statistics(features["pool"])
    blurred = np.stack([gaussian_filter(d[..., 0].astype(float), 0.8) for d in real]).round().astype(np.uint8)
    noise = np.random.default_rng(5).integers(0, 256, real.shape, dtype=np.uint8)
    fid = {name: frechet_distance(*statistics(extractor(x)["pool"]), *ref)
           for name, x in (("real", real), ("blurred", blurred[..., None]), ("noise", noise))}
    assert abs(fid["real"]) < 1e-6 and 1 < fid["blurred"] < fid["noise"] / 5 and fid["noise"] > 30
    with pytest.raises(ValueError, match="8x8"):
        extractor(np.zeros((2, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_feature_extractor("vgg")


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def test_npz_sources_stored_and_compressed_read_the_same(tmp_path) -> None:
    images = np.random.default_rng(6).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", arr_0=images, arr_1=np.arange(7))
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images)
    stored, compressed = NpzImages(tmp_path / "stored.npz"), NpzImages(tmp_path / "compressed.npz")
    assert stored._memmap is not None and compressed._memmap is None
    for index in (0, 3, 6, 2, 2, 5):  # forwards, backwards (reopens), repeated
        np.testing.assert_array_equal(stored[index], images[index])
        np.testing.assert_array_equal(compressed[index], images[index])
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        NpzImages(tmp_path / "floats.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="holds no images"):
        NpzImages(tmp_path / "stats.npz")


# ----------------------------------------------------------------------------------------------------------------------
# eval_fid.py with the digits extractor (fast: exercises every path but the Inception)


def test_eval_fid_digits_against_config_folder_and_batches(tmp_path, capsys) -> None:
    real, _ = real_digits_uint8()
    rgb = np.repeat(real, 3, axis=-1)
    np.savez(tmp_path / "real.npz", arr_0=rgb[:600])
    np.savez_compressed(tmp_path / "real_compressed.npz", arr_0=rgb[:600])
    _write_pngs(tmp_path / "real_pngs", real[:600])
    np.savez(tmp_path / "noise.npz", arr_0=np.random.default_rng(7).integers(0, 256, (300, 8, 8, 3), np.uint8))
    config = REPO / "configs" / "digits_uvit.py"

    scores = {}
    for name in ("real.npz", "real_compressed.npz", "real_pngs", "noise.npz"):
        code, out, err = _run_cli(capsys, tmp_path / name, config, "--metrics", "fid,is,pr", "--json",
                                  tmp_path / f"{name}.json", *DIGITS)
        assert code == 0, err
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["real.npz"]["fid"] == pytest.approx(scores["real_pngs"]["fid"], abs=1e-9)  # same pixels
    assert scores["real.npz"]["fid"] == pytest.approx(scores["real_compressed.npz"]["fid"], abs=1e-9)
    assert scores["real.npz"]["fid"] < 1.0 < 30 < scores["noise.npz"]["fid"]
    assert scores["real.npz"]["precision"] > 0.9 and scores["noise.npz"]["precision"] < 0.2
    assert scores["real.npz"]["inception_score"] > 8 > 2 > scores["noise.npz"]["inception_score"]
    record = scores["real.npz"]
    assert record["num_samples"] == 600 and record["samples"] == str((tmp_path / "real.npz").resolve())
    assert record["reference"] == {"path": f"{config} (digits)", "num_images": 1797, "statistics": "images"}
    assert record["extractor"].startswith("digits-mlp-") and record["metrics"] == ["fid", "is", "pr"]

    # the same reference as a statistics file (stats only), and as an ADM batch (its own or recomputed statistics)
    code, _, err = _run_cli(capsys, "--save-stats", tmp_path / "digits_stats.npz", config, *DIGITS)
    assert code == 0, err
    stats = read_statistics(tmp_path / "digits_stats.npz")
    assert set(stats) == {"mu", "sigma"} and stats["sigma"].shape == (64, 64)
    bogus = {"mu": stats["mu"] + 1, "sigma": stats["sigma"]}  # "ADM's" own statistics, other than ours
    np.savez(tmp_path / "adm_batch.npz", arr_0=np.repeat(real, 3, -1), **bogus)
    fids = {}
    for name, extra in (("stats", ["digits_stats.npz"]), ("batch", ["adm_batch.npz"]),
                        ("batch_own", ["adm_batch.npz", "--adm_stats"])):
        code, _, err = _run_cli(capsys, tmp_path / "real.npz", tmp_path / extra[0], *extra[1:], "--json",
                                tmp_path / "s.json", *DIGITS)
        assert code == 0, err
        fids[name] = json.loads((tmp_path / "s.json").read_text())
    assert fids["stats"]["fid"] == pytest.approx(record["fid"], rel=1e-6)
    assert fids["stats"]["reference"]["statistics"] == "file"
    assert fids["batch"]["fid"] == pytest.approx(record["fid"], rel=1e-6)
    assert fids["batch"]["reference"]["statistics"] == "images"
    sample_stats = statistics(build_feature_extractor("digits")(rgb[:600])["pool"])
    assert fids["batch_own"]["fid"] == pytest.approx(frechet_distance(*sample_stats, bogus["mu"], bogus["sigma"]))
    assert fids["batch_own"]["fid"] > record["fid"] + 10
    assert fids["batch_own"]["reference"]["statistics"] == "file"


def test_eval_fid_feature_cache_reused_and_invalidated(tmp_path, capsys) -> None:
    real, _ = real_digits_uint8()
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.repeat(real[:300], 3, -1))
    reference = [REPO / "configs" / "digits_uvit.py", *DIGITS, "--json", tmp_path / "s.json"]
    code, out, err = _run_cli(capsys, samples, *reference, "--metrics", "fid")
    assert code == 0, err
    cache = next(tmp_path.glob("samples.features-digits-mlp-*.npz"))
    written = cache.stat().st_mtime_ns
    first = json.loads((tmp_path / "s.json").read_text())

    code, out, _ = _run_cli(capsys, samples, *reference, "--metrics", "is")  # a second metric: features reused
    assert code == 0 and "(cached features)" in out and cache.stat().st_mtime_ns == written
    # an FID-only reference keeps running statistics, not every image's features, cached in the cache folder
    cache_dir = tmp_path / "xdg_cache" / "transformer-diffusion" / "eval"
    assert list(cache_dir.glob("reference-digits8-*-digits-*.npz"))
    assert not list(cache_dir.glob("digits8-*.features-*.npz"))

    time.sleep(0.01)
    np.savez(samples, arr_0=np.repeat(real[300:600], 3, -1))  # other images: the cache must not be used
    code, out, _ = _run_cli(capsys, samples, *reference, "--metrics", "fid")
    assert code == 0 and "(cached features)" not in out and cache.stat().st_mtime_ns != written
    assert json.loads((tmp_path / "s.json").read_text())["fid"] != pytest.approx(first["fid"])
    with np.load(cache) as data:
        assert data["pool"].shape == (300, 64)

    code, out, _ = _run_cli(capsys, samples, *reference, "--metrics", "fid", "--no_cache")
    assert code == 0 and "(cached features)" not in out


def test_save_stats_from_folders_configs_and_coco(tmp_path, capsys) -> None:
    extractor = build_feature_extractor("digits")
    # an ImageFolder tree of odd-sized images, ADM-centre-cropped to 8
    rng = np.random.default_rng(8)
    expected = []
    for i, size in enumerate([(20, 13), (9, 30), (16, 16), (40, 22)]):
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        (tmp_path / "tree" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / "tree" / f"class{i % 2}" / f"img{i}.png")
    for path in sorted((tmp_path / "tree").rglob("*.png")):
        expected.append(center_crop_arr(Image.open(path).convert("RGB"), 8))
    code, out, err = _run_cli(capsys, "--save-stats", tmp_path / "tree.npz", tmp_path / "tree", "--resolution", 8,
                              *DIGITS)
    assert code == 0 and "of 4 images" in out, err
    saved, direct = read_statistics(tmp_path / "tree.npz"), statistics(extractor(np.stack(expected))["pool"])
    np.testing.assert_allclose(saved["mu"], direct[0], rtol=1e-6)
    np.testing.assert_allclose(saved["sigma"], direct[1], rtol=1e-5, atol=1e-9)
    code, _, err = _run_cli(capsys, "--save-stats", tmp_path / "x.npz", tmp_path / "tree", *DIGITS)  # mixed sizes
    assert code == 2 and "--resolution" in err

    # a dataset config: the real digits
    code, _, err = _run_cli(capsys, "--save-stats", tmp_path / "digits.npz", REPO / "configs" / "digits_uvit.py",
                            *DIGITS)
    assert code == 0, err
    real_stats = statistics(extractor(real_digits_uint8()[0])["pool"])
    np.testing.assert_allclose(read_statistics(tmp_path / "digits.npz")["mu"], real_stats[0], rtol=1e-6)

    # MS-COCO's official layout: captioned images only, centre square
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3)]
    for i, entry in enumerate(images):
        Image.fromarray(rng.integers(0, 256, (12 + 4 * i, 10, 3), dtype=np.uint8)).save(root / "val2014" /
                                                                                       entry["file_name"])
    annotations = [{"image_id": 1, "id": 10, "caption": "a"}, {"image_id": 3, "id": 11, "caption": "b"}]
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images,
                                                                            "annotations": annotations}))
    code, out, err = _run_cli(capsys, "--save-stats", tmp_path / "coco.npz", root, "--coco", "val",
                              "--resolution", 8, *DIGITS)
    assert code == 0 and "of 2 images" in out, err


def test_eval_fid_clear_errors(tmp_path, capsys) -> None:
    real, _ = real_digits_uint8()
    np.savez(tmp_path / "s.npz", arr_0=np.repeat(real[:50], 3, -1))
    np.savez(tmp_path / "inception_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "digit_stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    cases = [
        (["s.npz", "digit_stats.npz", "--metrics", "pr"], "statistics file"),
        (["s.npz", "digit_stats.npz", "--metrics", "sfid"], "no spatial features"),
        (["s.npz", "digit_stats.npz", "--metrics", "fid,kid"], "unknown metrics"),
        (["s.npz", "inception_stats.npz"], "2048-d"),
        (["missing.npz", "digit_stats.npz"], "no such .npz"),
        (["s.npz", "s.npz", "--adm_stats"], "--adm_stats"),
        (["s.npz", str(REPO / "configs" / "imagenet256_uvit_l2.py")], "not images"),
        (["s.npz", str(REPO / "configs" / "digits_uvit.py"), "--config.data.nope=1"], "unknown config key"),
        (["s.npz"], "give SAMPLES and REFERENCE"),
        (["broken", "digit_stats.npz"], "cannot read image file"),
        (["--save-stats", "out.txt", "broken"], "writes an .npz"),
        (["garbage.npz", "digit_stats.npz"], "is not an .npz file (not a zip archive)"),
        (["s.npz", "garbage.npz"], "is not a readable .npz file"),
        (["s.npz", "digit_stats.npz", "--extractor=vgg"], "bad value for --extractor: expected one of"),
        (["s.npz", "digit_stats.npz", "--batch_size=many"], "bad value for --batch_size"),
        (["s.npz", "digit_stats.npz", f"--json={tmp_path / 'garbage.npz' / 'scores.json'}"], "File exists"),
    ]
    (tmp_path / "garbage.npz").write_text("not an archive")
    _write_pngs(tmp_path / "broken", real[:3])
    (tmp_path / "broken" / "0001.png").write_bytes(b"not a png")
    for argv, message in cases:
        paths = [tmp_path / a if a.endswith(".npz") or a == "broken" else a for a in argv]
        code, out, err = _run_cli(capsys, *paths, *DIGITS)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_reference_statistics_for_config(tmp_path) -> None:
    extractor = build_feature_extractor("digits")
    config = load_config(REPO / "configs" / "digits_uvit.py")
    stats = reference_statistics_for_config(config, extractor, tmp_path / "cache")
    real = statistics(extractor(real_digits_uint8()[0])["pool"])
    np.testing.assert_allclose(stats["mu"], real[0], rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], real[1], rtol=1e-5, atol=1e-9)
    (cache,) = (tmp_path / "cache").glob(f"reference-digits8-*-{extractor.id}.npz")
    written = cache.stat().st_mtime_ns
    again = reference_statistics_for_config(config, extractor, tmp_path / "cache")  # read back, not recomputed
    assert cache.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again["sigma"], stats["sigma"])

    np.savez(tmp_path / "given.npz", mu=np.ones(64), sigma=2 * np.eye(64))
    config.eval.reference = str(tmp_path / "given.npz")
    np.testing.assert_array_equal(reference_statistics_for_config(config, extractor, tmp_path)["mu"], np.ones(64))
    latent = load_config(REPO / "configs" / "imagenet256_uvit_l2.py")
    latent.eval.reference = ""  # the config may name its paper's statistics file; without one, latents are no images
    with pytest.raises(ConfigError, match="set eval.reference"):
        reference_statistics_for_config(latent, extractor, tmp_path)
    latent.eval.reference = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="eval.reference"):
        reference_statistics_for_config(latent, extractor, tmp_path)
    assert isinstance(config.eval, ConfigDict)


# ----------------------------------------------------------------------------------------------------------------------
# The FID Inception (random weights of the real architecture)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    return make_random_fid_inception(tmp_path_factory.mktemp("inception") / WEIGHTS_FILE)


def test_inception_matches_pytorch_fid(inception_file, tmp_path) -> None:
    """pytorch-fid's own InceptionV3 loads the file from its download cache; ours reads the same place."""
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILE
    hub_file.parent.mkdir(parents=True)
    os.link(inception_file, hub_file)
    from pytorch_fid.inception import InceptionV3

    theirs = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    spatial = {}
    theirs.blocks[2][6].branch1x1.register_forward_hook(lambda module, inputs, output: spatial.update(x=output))
    ours = build_feature_extractor("inception")  # no path: pytorch-fid's cache under TORCH_HOME
    assert ours.network.weights_path == hub_file
    assert ours.id == build_feature_extractor("inception", weights=str(inception_file)).id
    images = _smooth_images(3, 21, seed=0)[:, :, :17]  # not square, not 299: pytorch-fid's resize
    with torch.no_grad():
        pool = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    features = ours(images)
    torch.testing.assert_close(features["pool"], pool, rtol=0, atol=1e-5)
    assert pool.std(0).mean() > 0.1  # the random network's features vary
    expected_spatial = spatial["x"][:, :7].permute(0, 2, 3, 1).reshape(3, 2023)  # (h, w, c) order
    torch.testing.assert_close(features["spatial"], expected_spatial, rtol=0, atol=1e-5)
    fc = torch.load(inception_file, weights_only=True)["fc.weight"]
    torch.testing.assert_close(features["logits"], pool @ fc.T, rtol=1e-5, atol=1e-4)  # no bias, as ADM's IS
    grey = ours(images[..., :1])["pool"]  # grey is read as RGB with equal channels, like pytorch-fid's convert
    torch.testing.assert_close(grey, ours(np.repeat(images[..., :1], 3, -1))["pool"])


def test_missing_or_wrong_inception_weights(tmp_path, capsys) -> None:
    with pytest.raises(InceptionWeightsNotFoundError, match="pytorch-fid/releases"):
        load_fid_inception("")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_fid_inception(tmp_path / "other.pth")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "r.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    expected_place = str(tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILE)  # TORCH_HOME's hub cache
    code, _, err = _run_cli(capsys, tmp_path / "s.npz", tmp_path / "r.npz", "--inception", tmp_path / "nowhere.pth")
    assert code == 2 and "nowhere.pth" in err and expected_place in err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the command itself: exit 2, one line, no traceback
    proc = subprocess.run([sys.executable, "eval_fid.py", tmp_path / "s.npz", tmp_path / "r.npz"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "https://github.com/mseitzer/pytorch-fid/releases" in proc.stderr and expected_place in proc.stderr


def _fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """The exact FID of two small sets (n < D) through the singular values of A B^T, without any D x D root:
    the nonzero eigenvalues of sigma_a sigma_b are those of (A B^T)(B A^T) / (n - 1)^2 (A, B centred features)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    diff = a.mean(0) - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    return float(diff @ diff + (ca**2).sum() / (len(a) - 1) + (cb**2).sum() / (len(b) - 1) - 2 * cross)


def test_eval_fid_inception_end_to_end(inception_file, tmp_path, capsys) -> None:
    """npz samples against an ADM batch with every metric; folder samples against a statistics file made by
    --save-stats from a folder; the features cached and reused."""
    extractor = build_feature_extractor("inception", weights=str(inception_file))
    samples, reference = _smooth_images(12, 16, seed=1), _smooth_images(12, 16, seed=2)
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(12))
    np.savez(tmp_path / "VIRTUAL_batch.npz", arr_0=reference, mu=np.zeros(2048), sigma=np.eye(2048),
             mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    # pytorch-fid's rules throughout (an ADM batch with no --protocol is scored under adm)
    weights = ["--inception", inception_file, "--num_workers", "0", "--batch_size", "5", "--protocol", "pytorch_fid"]
    code, out, err = _run_cli(capsys, tmp_path / "samples.npz", tmp_path / "VIRTUAL_batch.npz", "--metrics",
                              "fid,sfid,is,pr", "--json", tmp_path / "scores.json", *weights)
    assert code == 0, err
    scores = json.loads((tmp_path / "scores.json").read_text())
    ours, theirs = extractor(samples), extractor(reference)
    assert scores["fid"] == pytest.approx(_fid_from_features(ours["pool"].numpy(), theirs["pool"].numpy()),
                                          rel=1e-3)
    assert scores["sfid"] == pytest.approx(_fid_from_features(ours["spatial"].numpy(), theirs["spatial"].numpy()),
                                           rel=1e-3)
    assert scores["fid"] > 1 and scores["sfid"] > 0.1
    assert scores["inception_score"] == pytest.approx(inception_score(ours["logits"])[0], rel=1e-5)
    assert (scores["precision"], scores["recall"]) == pytest.approx(precision_recall(theirs["pool"], ours["pool"]))
    assert scores["reference"] == {"path": str(tmp_path / "VIRTUAL_batch.npz"), "num_images": 12,
                                   "statistics": "images"}
    cache = tmp_path / f"samples.features-{extractor.id}.npz"
    with np.load(cache) as data:
        np.testing.assert_allclose(data["pool"], ours["pool"].numpy(), rtol=1e-5, atol=1e-5)
        assert data["spatial"].shape == (12, 2023) and data["logits"].shape == (12, 1008)
    written = cache.stat().st_mtime_ns
    code, out, _ = _run_cli(capsys, tmp_path / "samples.npz", tmp_path / "VIRTUAL_batch.npz", "--metrics", "is",
                            *weights)
    assert code == 0 and cache.stat().st_mtime_ns == written
    assert out.count("cached features") == 1  # the samples'; the reference's statistics are now computed and cached
    code, out, _ = _run_cli(capsys, tmp_path / "samples.npz", tmp_path / "VIRTUAL_batch.npz", "--metrics", "is",
                            *weights)
    assert code == 0 and out.count("cached features") == 1 and "cached statistics" in out

    # --save-stats from a folder (round trip with the features of its images), then folder samples against it
    _write_pngs(tmp_path / "ref_pngs", reference)
    code, out, err = _run_cli(capsys, "--save-stats", tmp_path / "ref_stats.npz", tmp_path / "ref_pngs", *weights)
    assert code == 0, err
    saved = read_statistics(tmp_path / "ref_stats.npz")
    assert set(saved) == {"mu", "sigma", "mu_s", "sigma_s"}
    for key, features in (("", theirs["pool"]), ("_s", theirs["spatial"])):
        mu, sigma = statistics(features)
        np.testing.assert_allclose(saved["mu" + key], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["sigma" + key], sigma, rtol=1e-4, atol=1e-6)
    _write_pngs(tmp_path / "sample_pngs", samples)
    code, out, err = _run_cli(capsys, tmp_path / "sample_pngs", tmp_path / "ref_stats.npz", "--metrics", "is",
                              "--json", tmp_path / "folder.json", *weights)
    assert code == 0, err
    assert json.loads((tmp_path / "folder.json").read_text())["inception_score"] == pytest.approx(
        scores["inception_score"], rel=1e-5)
    assert (tmp_path / f"sample_pngs.features-{extractor.id}.npz").is_file()


def _launch_two(script: Path, *args) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port: other test runs may be using accelerate's default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
           "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_equal_one(inception_file, tmp_path, capsys) -> None:
    """Features gathered from two processes (Inception) and statistics all-reduced over two (--save-stats, digits)
    equal one process's (in this process, on one thread like the launched ones). One launch runs both commands."""
    images = _smooth_images(10, 12, seed=3)  # batches of 3: rank 0 takes [0, 3) and [6, 9), rank 1 the rest
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    config = REPO / "configs" / "digits_uvit.py"
    commands = {}
    for procs in (1, 2):
        folder = tmp_path / f"run{procs}"
        folder.mkdir()
        np.savez(folder / "samples.npz", arr_0=images)
        commands[procs] = [
            [folder / "samples.npz", tmp_path / "ref.npz", "--metrics", "is", "--inception", inception_file,
             "--batch_size", 3, "--json", folder / "scores.json"],
            ["--save-stats", folder / "digits.npz", config, "--batch_size", 100, *DIGITS]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert [_run_cli(capsys, *argv)[0] for argv in commands[1]] == [0, 0]
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "run_both.py"
    script.write_text("import json, sys\nimport eval_fid\n"
                      "sys.exit(max(eval_fid.main(argv) for argv in json.loads(sys.argv[1])))\n")
    proc = _launch_two(script, json.dumps([[str(a) for a in argv] for argv in commands[2]]))
    assert proc.returncode == 0 and proc.stderr.count("(2 proc)") >= 2, proc.stderr[-3000:]

    features, stats, scores = {}, {}, {}
    for procs in (1, 2):
        folder = tmp_path / f"run{procs}"
        (cache,) = folder.glob("samples.features-inception-*.npz")
        with np.load(cache) as data:
            features[procs] = {key: data[key] for key in ("pool", "logits", "spatial")}
        stats[procs] = read_statistics(folder / "digits.npz")
        scores[procs] = json.loads((folder / "scores.json").read_text())
    for key in features[1]:
        np.testing.assert_array_equal(features[2][key], features[1][key])
    assert scores[1]["inception_score"] == scores[2]["inception_score"]
    for key in ("mu", "sigma"):  # the digits classifier is fit in each process: equal up to float rounding
        np.testing.assert_allclose(stats[2][key], stats[1][key], rtol=1e-5, atol=1e-7)


def test_generated_statistics_for_training(tmp_path) -> None:
    """FID during training: images drawn on the fly against the config's reference statistics."""
    extractor = build_feature_extractor("digits")
    config = load_config(REPO / "configs" / "digits_uvit.py")
    reference = reference_statistics_for_config(config, extractor, tmp_path)
    real = np.repeat(real_digits_uint8()[0], 3, axis=-1)
    drawn = []

    def draw(indices: range) -> np.ndarray:
        drawn.append(indices)
        return real[indices.start:indices.stop]

    stats = generated_statistics(draw, len(real), extractor, batch_size=500)
    assert [len(r) for r in drawn] == [500, 500, 500, 297] and set(stats) == {"mu", "sigma"}
    assert frechet_distance(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"]) == pytest.approx(
        0, abs=1e-6)
    half = generated_statistics(lambda r: real[::2][r.start:r.stop], len(real) // 2, extractor)
    assert frechet_distance(half["mu"], half["sigma"], reference["mu"], reference["sigma"]) > 1e-3
