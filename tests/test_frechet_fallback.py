"""The Frechet distance where scipy.linalg.sqrtm breaks (LightningDiT issue #97: NaN / complex roots under an OpenBLAS
ILP64 build): pytorch-fid's and ADM's numbers stay bit for bit where they give one, the eigendecomposition fallback
agrees with scipy where both work, gives the closed form on rank-deficient covariances, and takes over when scipy's
root is forced to fail (monkeypatched here, standing in for the broken BLAS).

ADM's ``evaluations/evaluator.py`` (``FIDStatistics.frechet_distance``) runs the same numpy/scipy operations in the
same order as pytorch-fid (both TTUR's code), so equality with pytorch-fid is equality with ADM's evaluator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from pytorch_fid.fid_score import calculate_frechet_distance

from diffusion.errors import InputError
from diffusion.evaluation import metrics
from diffusion.evaluation.metrics import frechet_distance, statistics, trace_sqrt_product


def covariance(rng, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def pytorch_fid(*stats) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm's disp=, which pytorch-fid passes
        return calculate_frechet_distance(*stats)


def commuting_pair(rng, d: int, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Two rank-``rank`` covariances with the same eigenvectors and their closed-form tr((s1 s2)^(1/2))."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    a[rank:] = 0.0
    b[rank // 2:rank // 2 + d // 4] = 0.0  # zeros where a has none, too
    return (q * a) @ q.T, (q * b) @ q.T, float(np.sqrt(a * b).sum())


@pytest.fixture
def broken_sqrtm(monkeypatch):
    """scipy.linalg.sqrtm as under the broken BLAS: ``mode`` "nan" or "complex" (a large imaginary part)."""
    def install(mode: str):
        true_sqrtm = scipy.linalg.sqrtm

        def sqrtm(a, *args, **kwargs):
            if mode == "nan":
                root = np.full(np.shape(a), np.nan)
            else:
                root = true_sqrtm(a) + 0.5j * np.eye(len(a))
            return (root, 1.0) if kwargs.get("disp") is False else root  # pytorch-fid asks for disp=False

        monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm)
    return install


def test_pytorch_fids_numbers_stay_bit_for_bit():
    rng = np.random.default_rng(0)
    full = [(rng.standard_normal(48), covariance(rng, 48)) for _ in range(2)]
    singular = [statistics(rng.standard_normal((20, 96)) + shift) for shift in (0.0, 0.3)]  # the eps * I retry
    same = [full[0], full[0]]
    for (mu1, s1), (mu2, s2) in (full, singular, same):
        assert frechet_distance(mu1, s1, mu2, s2) == pytorch_fid(mu1, s1, mu2, s2)


def test_the_fallback_agrees_with_scipy_on_well_conditioned_statistics():
    rng = np.random.default_rng(1)
    for d in (8, 64, 256):
        s1, s2 = covariance(rng, d), covariance(rng, d)
        scipy_trace = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
        assert trace_sqrt_product(s1, s2) == pytest.approx(scipy_trace, rel=1e-9)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        with pytest.MonkeyPatch.context() as patch, pytest.warns(RuntimeWarning, match="sqrtm failed"):
            patch.setattr(metrics, "_scipy_root", lambda *_: (None, "forced"))
            fallback = frechet_distance(mu1, s1, mu2, s2)
        assert fallback == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)


def test_rank_deficient_covariances_give_the_closed_form():
    rng = np.random.default_rng(2)
    for d, rank in ((16, 5), (128, 40)):
        s1, s2, expected = commuting_pair(rng, d, rank)
        assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        a, b = rng.uniform(0, 2, d), rng.uniform(0, 2, d)
        a[::3] = 0.0  # diagonal ones with zero variances: tr sqrt = sum sqrt(a_i b_i)
        assert trace_sqrt_product(np.diag(a), np.diag(b)) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-12)


@pytest.mark.parametrize("mode", ["nan", "complex"])
def test_a_broken_scipy_root_falls_back_and_stays_finite(broken_sqrtm, mode):
    rng = np.random.default_rng(3)
    s1, s2, trace = commuting_pair(rng, 64, 30)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * trace)
    broken_sqrtm(mode)
    if mode == "nan":
        assert np.isnan(pytorch_fid(mu1, s1, mu2, s2))  # the reported failure: pytorch-fid returns NaN
    else:
        with pytest.raises(ValueError, match="Imaginary component"):
            pytorch_fid(mu1, s1, mu2, s2)
    with pytest.warns(RuntimeWarning, match="sqrtm failed"):
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_numpys_lapack_takes_over_from_torchs(monkeypatch):
    rng = np.random.default_rng(4)
    s1, s2 = covariance(rng, 32), covariance(rng, 32)
    expected = trace_sqrt_product(s1, s2)
    monkeypatch.setattr(metrics, "_torch_eigh", lambda a: (np.full(len(a), np.nan), np.full(a.shape, np.nan)))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)


def test_statistics_that_are_no_covariances_are_still_refused():
    with pytest.raises(InputError, match="not a covariance matrix.*imaginary part"):  # sqrt(-I) = i I
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), np.eye(3))
    sigma = np.eye(3)
    sigma[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or inf"):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3))
