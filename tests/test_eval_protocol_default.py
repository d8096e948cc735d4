"""eval_fid.py's protocol when none is asked for: an ADM reference batch (mu, sigma, mu_s, sigma_s beside arr_0) is
scored under adm, as DiT, SiT and REPA score against it, and the first line of output says so; --protocol
pytorch_fid still forces pytorch-fid's rules; other references keep pytorch_fid."""

from __future__ import annotations

import json

import numpy as np
import pytest

import eval_fid
from diffusion.evaluation import build_feature_extractor, frechet_distance, statistics
from diffusion.evaluation.digits import real_digits_uint8
from tests.helpers import DIGITS_EXTRACTOR as DIGITS

pytestmark = pytest.mark.usefixtures("private_caches")


def run(capsys, *argv) -> tuple[int, list[str], str]:
    code = eval_fid.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


@pytest.fixture(scope="module")
def digits():
    real, _ = real_digits_uint8()
    rgb = np.repeat(real, 3, -1)
    features = build_feature_extractor("digits")(rgb)["pool"]
    return rgb, statistics(features[:300]), statistics(features)


def test_an_adm_batch_is_scored_under_adm_unless_pytorch_fid_is_asked_for(tmp_path, capsys, digits):
    rgb, sample_stats, image_stats = digits
    np.savez(tmp_path / "samples.npz", arr_0=rgb[:300])
    # the batch's stored statistics differ from those of its images, so the two protocols give different FIDs
    stored = {"mu": image_stats[0] + 1, "sigma": image_stats[1], "mu_s": np.zeros(4), "sigma_s": np.eye(4)}
    np.savez(tmp_path / "VIRTUAL_digits.npz", arr_0=rgb, **stored)
    scores = {}
    for name, extra in (("default", []), ("pytorch_fid", ["--protocol", "pytorch_fid"])):
        code, lines, err = run(capsys, tmp_path / "samples.npz", tmp_path / "VIRTUAL_digits.npz", *DIGITS,
                               "--json", tmp_path / f"{name}.json", *extra)
        assert code == 0, err
        scores[name] = (lines, json.loads((tmp_path / f"{name}.json").read_text()))
    lines, record = scores["default"]
    assert lines[0].startswith("protocol adm") and "VIRTUAL_digits.npz is an ADM reference batch" in lines[0]
    assert "--protocol pytorch_fid" in lines[0] and lines[-1].endswith("s]") and "protocol adm" in lines[-1]
    assert record["protocol"] == "adm" and record["reference"]["statistics"] == "file"
    assert record["fid"] == pytest.approx(frechet_distance(*sample_stats, stored["mu"], stored["sigma"]), rel=1e-9)
    lines, record = scores["pytorch_fid"]
    assert not any(line.startswith("protocol adm") for line in lines) and "protocol pytorch_fid" in lines[-1]
    assert record["protocol"] == "pytorch_fid" and record["reference"]["statistics"] == "images"
    assert record["fid"] == pytest.approx(frechet_distance(*sample_stats, *image_stats), rel=1e-6)
    assert scores["default"][1]["fid"] > record["fid"] + 10


def test_other_npz_references_keep_pytorch_fid(tmp_path, capsys, digits):
    rgb, _, image_stats = digits
    np.savez(tmp_path / "samples.npz", arr_0=rgb[:300])
    np.savez(tmp_path / "stats.npz", mu=image_stats[0], sigma=image_stats[1])  # a statistics file
    np.savez(tmp_path / "images.npz", arr_0=rgb)  # images only
    for reference in ("stats.npz", "images.npz"):
        code, lines, err = run(capsys, tmp_path / "samples.npz", tmp_path / reference, *DIGITS)
        assert code == 0, err
        assert len(lines) == 2 and lines[0].startswith("FID ") and "protocol pytorch_fid" in lines[1], reference
