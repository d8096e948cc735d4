"""The adm evaluation protocol (ADM's evaluations/evaluator.py, behind DiT's, SiT's and REPA's numbers): its front end
against TensorFlow's own resize (tests/fixtures/tf_resize.pt) and pytorch-fid's network, the stored statistics of an
ADM reference batch, IS in splits of 5,000, float16 precision/recall distances against a NumPy transcription of
ADM's DistanceBlock / ManifoldEstimator, eval_fid.py --protocol end to end and in-training FID with
eval.protocol=adm."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import eval_fid
from diffusion.config.schema import EVAL_PROTOCOLS
from diffusion.evaluation import (
    PROTOCOLS,
    build_feature_extractor,
    frechet_distance,
    get_protocol,
    inception_score,
    precision_recall,
    reference_statistics_for_config,
    statistics,
)
from diffusion.evaluation.digits import real_digits_uint8
from diffusion.evaluation.inception import WEIGHTS_FILE, FIDInception, build_fid_inception, resize_bilinear_tf1
from diffusion.evaluation.metrics import ADM_TILE
from diffusion.evaluation.training import TrainingFID
from diffusion.sampling.loader import load_for_sampling
from diffusion.training.loop import train
from tests.helpers import DIGITS_EXTRACTOR as DIGITS
from tests.helpers import REPO, load_fixture, make_random_fid_inception, tiny_config

pytestmark = pytest.mark.usefixtures("private_caches")


@pytest.fixture(scope="module")
def tf_resize() -> dict:
    return load_fixture("tf_resize")


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = eval_fid.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(path) -> dict:
    return json.loads(path.read_text())


def test_protocols_are_the_config_choices() -> None:
    assert tuple(PROTOCOLS) == EVAL_PROTOCOLS
    adm = get_protocol("adm")
    assert (adm.front_end, adm.stored_statistics, adm.is_split_size, adm.distances) == ("adm", True, 5000, "fp16")
    assert ADM_TILE == 10_000  # ADM's ManifoldEstimator row_batch_size / col_batch_size
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        get_protocol("clean_fid")


# ----------------------------------------------------------------------------------------------------------------------
# The front end


def test_adm_front_end_equals_tensorflow_resize(tf_resize) -> None:
    """TF1 ResizeBilinear (no half-pixel centres) of float [0, 255] images, for every size in the fixture, then
    (x - 128) / 128; pytorch-fid's front end is another resize."""
    network = FIDInception(build_fid_inception(), front_end="adm")
    sizes = sorted(int(key.split("_")[1]) for key in tf_resize["inputs"])
    assert sizes == [32, 64, 256]
    for size in sizes:
        image = tf_resize["inputs"][f"image_{size}"].permute(0, 3, 1, 2).float()  # uint8 NHWC -> float NCHW
        expected = tf_resize["output"][f"resized_{size}"].permute(0, 3, 1, 2)
        torch.testing.assert_close(resize_bilinear_tf1(image), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(network.prepare(image), (expected - 128) / 128, rtol=0, atol=1e-6)
        pytorch_fid = FIDInception(network.inception).prepare(image)
        assert (pytorch_fid - (expected - 128) / 128).abs().max() > 0.01
    with pytest.raises(ValueError, match="front end"):
        FIDInception(network.inception, front_end="tf2")


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score in splits of 5,000


def _adm_score(p: np.ndarray) -> float:
    """ADM's compute_inception_score of one split's softmax predictions."""
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1))))


def test_inception_score_in_splits_of_5000() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(10, 0.3), size=10_001)  # synthetic softmax predictions, all positive
    logits = np.log(p)  # their softmax is p
    adm = get_protocol("adm")
    halves = [_adm_score(p[:5000]), _adm_score(p[5000:10_000])]
    score, std = adm.inception_score(logits[:10_000])
    assert score == pytest.approx(np.mean(halves), rel=1e-9) and std == pytest.approx(np.std(halves), rel=1e-6)
    ten = np.mean([_adm_score(part) for part in np.split(p[:10_000], 10)])
    assert get_protocol("pytorch_fid").inception_score(logits[:10_000])[0] == pytest.approx(ten, rel=1e-9)
    assert abs(ten - score) > 1e-3  # 10 splits of 1,000 are another estimate
    # N not a multiple: range(0, N, 5000), the last split one sample (its score exp(0) = 1)
    assert adm.inception_score(logits)[0] == pytest.approx(np.mean([*halves, 1.0]), rel=1e-9)
    assert adm.inception_score(logits[:7])[0] == pytest.approx(_adm_score(p[:7]), rel=1e-9)  # one split
    assert inception_score(logits[:10_000], split_size=5000)[0] == score


# ----------------------------------------------------------------------------------------------------------------------
# Precision/recall with ADM's float16 distances


def _adm_block(u: np.ndarray, v: np.ndarray, fallback: bool = True) -> np.ndarray:
    """ADM's DistanceBlock in NumPy: features cast to float16, every operation rounded to float16 (products summed in
    float32), max(., 0); the block in float32 if any distance is not finite."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(all="ignore"):
        norm_u = (u16 * u16).astype(np.float32).sum(1).astype(np.float16)[:, None]
        norm_v = (v16 * v16).astype(np.float32).sum(1).astype(np.float16)[None]
        product = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        block = np.maximum(norm_u - np.float16(2) * product + norm_v, np.float16(0))
    if fallback and not np.isfinite(block).all():
        u, v = u.astype(np.float32), v.astype(np.float32)
        block = np.maximum((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None], 0)
    return block.astype(np.float32)


def _adm_pr(ref: np.ndarray, gen: np.ndarray, tile: int, k: int = 3, fallback: bool = True) -> tuple[float, float]:
    """ADM's ManifoldEstimator.manifold_radii and evaluate_pr (row and column batches of ``tile``) in NumPy."""
    def radii(x):
        out = np.zeros(len(x), np.float32)
        for r in range(0, len(x), tile):
            row = np.concatenate([_adm_block(x[r:r + tile], x[c:c + tile], fallback) for c in range(0, len(x), tile)],
                                 1)
            out[r:r + tile] = np.partition(row, k, axis=1)[:, k]
        return out

    ref_radii, gen_radii = radii(ref), radii(gen)
    ref_in, gen_in = np.zeros(len(ref), bool), np.zeros(len(gen), bool)
    for r in range(0, len(ref), tile):
        for c in range(0, len(gen), tile):
            block = _adm_block(ref[r:r + tile], gen[c:c + tile], fallback)
            ref_in[r:r + tile] |= (block <= gen_radii[c:c + tile][None]).any(1)
            gen_in[c:c + tile] |= (block <= ref_radii[r:r + tile][:, None]).any(0)
    return float(gen_in.mean()), float(ref_in.mean())


def test_fp16_distances_decide_as_adm() -> None:
    # Reference 0, 1, 2, 3 on a line: 3rd-neighbour radii 9, 4, 4, 9. The sample at -3.0004 is 9.0024 from 0 in
    # float32 (outside every ball), but float16 rounds it to -3.0: distance 9 <= 9, inside.
    ref = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], np.float32)
    gen = np.array([[-3.0004, 0], [1.5, 0], [10, 0], [11, 0]], np.float32)
    assert precision_recall(ref, gen) == (0.25, 1.0)
    assert get_protocol("adm").precision_recall(ref, gen) == (0.5, 1.0) == _adm_pr(ref, gen, tile=10_000)
    # random sets, many blocks: every decision as ADM's, and float16 decides some differently from float32
    differ = 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref = (rng.standard_normal((300, 16)) * 3).astype(np.float32)
        gen = (rng.standard_normal((250, 16)) * 3.3 + 0.3).astype(np.float32)
        adm = precision_recall(ref, gen, distances="fp16", tile=64)
        assert adm == pytest.approx(_adm_pr(ref, gen, tile=64), abs=1e-12)
        assert adm == pytest.approx(precision_recall(ref, gen, distances="fp16", tile=1000), abs=1e-12)  # one block
        differ += adm != precision_recall(ref, gen)
    assert differ >= 1


def test_non_finite_fp16_distances_fall_back_to_fp32_per_block() -> None:
    rng = np.random.default_rng(5)
    ref = (rng.standard_normal((64, 8)) * 3).astype(np.float32)
    gen = (rng.standard_normal((48, 8)) * 3 + 0.5).astype(np.float32)
    # everything far out (squared norms ~ 1e7 > float16's 65504): every block in float32, as precision_recall's fp32
    big_ref, big_gen = ref * 1000, gen * 1000
    fp32 = precision_recall(big_ref, big_gen)
    assert precision_recall(big_ref, big_gen, distances="fp16", tile=16) == fp32 == _adm_pr(big_ref, big_gen, 16)
    assert _adm_pr(big_ref, big_gen, 16, fallback=False) != fp32  # float16 alone: inf and NaN distances
    # a quarter of the points far out: their blocks fall back, the others stay float16 (ADM's per-block rule)
    mixed_ref, mixed_gen = ref.copy(), gen.copy()
    mixed_ref[48:] *= 1000
    mixed_gen[36:] *= 1000
    expected = _adm_pr(mixed_ref, mixed_gen, tile=16)
    assert precision_recall(mixed_ref, mixed_gen, distances="fp16", tile=16) == pytest.approx(expected, abs=1e-12)
    assert _adm_pr(mixed_ref, mixed_gen, 16, fallback=False) != expected


# ----------------------------------------------------------------------------------------------------------------------
# Stored statistics (digits: every rule of the protocol but the Inception's front end)


def test_adm_uses_stored_statistics_for_fid_and_images_for_pr(tmp_path, capsys) -> None:
    real, _ = real_digits_uint8()
    rgb = np.repeat(real, 3, -1)
    extractor = build_feature_extractor("digits", protocol="adm")
    assert extractor.id == build_feature_extractor("digits").id  # no front end to change: the same features
    stored = statistics(extractor(rgb[1000:])["pool"])  # statistics of other images than arr_0's
    np.savez(tmp_path / "VIRTUAL_digits.npz", arr_0=rgb[:500], mu=stored[0], sigma=stored[1])
    np.savez(tmp_path / "images_only.npz", arr_0=rgb[:500])
    np.savez(tmp_path / "samples.npz", arr_0=rgb[500:800])
    samples = extractor(rgb[500:800])
    ref_features = extractor(rgb[:500])["pool"]

    def score(reference, *flags):
        code, out, err = _run_cli(capsys, tmp_path / "samples.npz", tmp_path / reference, "--metrics", "fid,is,pr",
                                  "--json", tmp_path / "s.json", *DIGITS, *flags)
        assert code == 0, err
        return _json(tmp_path / "s.json"), out

    adm, out = score("VIRTUAL_digits.npz", "--protocol", "adm")
    assert "protocol adm" in out
    assert adm["protocol"] == "adm" and adm["reference"]["statistics"] == "file"
    assert adm["fid"] == pytest.approx(frechet_distance(*statistics(samples["pool"]), *stored), rel=1e-6)
    assert (adm["precision"], adm["recall"]) == pytest.approx(
        precision_recall(ref_features, samples["pool"], distances="fp16"), abs=1e-12)
    assert adm["inception_score"] == pytest.approx(inception_score(samples["logits"], split_size=5000)[0], rel=1e-9)
    assert adm["inception_score_std"] == 0  # 300 samples: one split of ADM's 5,000

    theirs, _ = score("VIRTUAL_digits.npz")  # pytorch_fid: the statistics of arr_0
    assert theirs["protocol"] == "pytorch_fid" and theirs["reference"]["statistics"] == "images"
    assert theirs["fid"] == pytest.approx(frechet_distance(*statistics(samples["pool"]), *statistics(ref_features)),
                                          rel=1e-6)
    assert abs(theirs["fid"] - adm["fid"]) > 0.1
    assert score("VIRTUAL_digits.npz", "--adm_stats")[0]["fid"] == pytest.approx(adm["fid"], rel=1e-9)
    both = score("VIRTUAL_digits.npz", "--adm_stats", "--protocol", "adm")[0]
    assert both["fid"] == pytest.approx(adm["fid"], rel=1e-9)
    # a batch without stored statistics: computed from its images, as ADM's read_statistics does
    images_only = score("images_only.npz", "--protocol", "adm")[0]
    assert images_only["reference"]["statistics"] == "images"
    assert images_only["fid"] == pytest.approx(theirs["fid"], rel=1e-6)
    # a config REFERENCE's eval.protocol is the default
    config = score(REPO / "configs" / "digits_uvit.py", "--config.eval.protocol=adm")[0]
    assert config["protocol"] == "adm"
    assert score(REPO / "configs" / "digits_uvit.py", "--config.eval.protocol=adm", "--protocol", "pytorch_fid"
                 )[0]["protocol"] == "pytorch_fid"


# ----------------------------------------------------------------------------------------------------------------------
# eval_fid --protocol adm with the FID Inception (random weights of the real architecture)


def test_eval_fid_adm_end_to_end_with_inception(tmp_path, capsys, tf_resize) -> None:
    """Sample 0 is the fixture's 32 x 32 image: its adm features equal pytorch-fid's own network fed TensorFlow's
    resize of it, (x - 128) / 128. Features of both protocols are cached apart."""
    inception_file = make_random_fid_inception(tmp_path / "inception" / WEIGHTS_FILE)
    hub_file = tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILE  # where pytorch-fid's network reads
    hub_file.parent.mkdir(parents=True)
    os.link(inception_file, hub_file)
    rng = np.random.default_rng(0)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.random((7, 3, 4, 4), np.float32)), size=(32, 32),
                                             mode="bilinear")
    others = (smooth * 255).round().byte().permute(0, 2, 3, 1).numpy()
    samples = np.concatenate([tf_resize["inputs"]["image_32"].numpy(), others[:3]])
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "VIRTUAL_batch.npz", arr_0=others[3:], mu=np.zeros(2048), sigma=np.eye(2048))
    weights = ["--inception", inception_file, "--num_workers", "0", "--batch_size", "4"]
    code, out, err = _run_cli(capsys, tmp_path / "samples.npz", tmp_path / "VIRTUAL_batch.npz", "--protocol", "adm",
                              "--metrics", "is,pr", "--json", tmp_path / "adm.json", *weights)
    assert code == 0, err
    scores = _json(tmp_path / "adm.json")
    assert scores["protocol"] == "adm" and scores["extractor"].endswith("-adm") and "protocol adm" in out
    with np.load(tmp_path / f"samples.features-{scores['extractor']}.npz") as data:
        ours = {key: data[key] for key in ("pool", "logits", "spatial")}
    with np.load(tmp_path / f"VIRTUAL_batch.features-{scores['extractor']}.npz") as data:
        reference = data["pool"]

    from pytorch_fid.inception import InceptionV3

    theirs = InceptionV3([3], resize_input=False, normalize_input=False).eval()
    resized = tf_resize["output"]["resized_32"].permute(0, 3, 1, 2)
    with torch.no_grad():
        pool = theirs((resized - 128) / 128)[0].flatten(1)
    np.testing.assert_allclose(ours["pool"][:1], pool.numpy(), rtol=1e-5, atol=1e-4)  # convolution rounding
    assert scores["inception_score"] == pytest.approx(inception_score(ours["logits"], split_size=5000)[0], rel=1e-6)
    assert (scores["precision"], scores["recall"]) == pytest.approx(_adm_pr(reference, ours["pool"], ADM_TILE))

    code, _, err = _run_cli(capsys, tmp_path / "samples.npz", tmp_path / "VIRTUAL_batch.npz", "--metrics", "pr",
                            "--json", tmp_path / "pt.json", *weights)
    assert code == 0, err
    plain = _json(tmp_path / "pt.json")
    assert plain["protocol"] == "pytorch_fid" and plain["extractor"] + "-adm" == scores["extractor"]
    with np.load(tmp_path / f"samples.features-{plain['extractor']}.npz") as data:
        assert np.abs(data["pool"] - ours["pool"]).max() > 1e-3  # another front end, other features, another cache


# ----------------------------------------------------------------------------------------------------------------------
# FID during training


def test_fid_during_training_with_the_adm_protocol(tmp_path) -> None:
    """eval.protocol=adm with an ADM batch as eval.reference: the run's FID is against the batch's stored statistics
    (the same score as a plain statistics file of them gives), not those of its images."""
    real, _ = real_digits_uint8()
    rgb = np.repeat(real, 3, -1)
    extractor = build_feature_extractor("digits")
    stored = statistics(extractor(rgb[1000:])["pool"])
    np.savez(tmp_path / "batch.npz", arr_0=rgb[:1000], mu=stored[0], sigma=stored[1])
    np.savez(tmp_path / "stats.npz", mu=stored[0], sigma=stored[1])
    overrides = ["--config.train.steps=2", "--config.train.ckpt_every=2", "--config.eval.every=2",
                 "--config.eval.n_samples=20", "--config.eval.batch_size=20", "--config.eval.feature_extractor=digits"]
    config = tiny_config(*overrides, "--config.eval.protocol=adm", f"--config.eval.reference={tmp_path / 'batch.npz'}")
    np.testing.assert_array_equal(reference_statistics_for_config(config, extractor, tmp_path / "c")["mu"], stored[0])
    config.eval.protocol = "pytorch_fid"  # the statistics of arr_0's images instead
    recomputed = reference_statistics_for_config(config, extractor, tmp_path / "c")
    np.testing.assert_allclose(recomputed["mu"], statistics(extractor(rgb[:1000])["pool"])[0], rtol=1e-5, atol=1e-7)
    config.eval.protocol = "adm"

    final = train(config, tmp_path / "run")
    history = _json(tmp_path / "run" / "fid.json")
    ready = load_for_sampling(final)
    ready.config.eval.reference = str(tmp_path / "stats.npz")
    fid = TrainingFID(ready.config, tmp_path / "check", state=None, device="cpu", objective=ready.objective,
                      shape=ready.image_shape)
    assert history["scores"]["2"] == pytest.approx(fid(ready.model, 20), rel=1e-6)
    ready.config.eval.reference, ready.config.eval.protocol = str(tmp_path / "batch.npz"), "pytorch_fid"
    images = TrainingFID(ready.config, tmp_path / "check", state=None, device="cpu", objective=ready.objective,
                         shape=ready.image_shape)
    assert abs(images(ready.model, 20) - history["scores"]["2"]) > 0.1
