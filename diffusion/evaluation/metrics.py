"""The numbers: Gaussian statistics, Frechet distance (FID, sFID), Inception Score, precision and recall.

Every function takes features as numpy arrays or tensors (N, D) and follows the evaluators the papers' numbers come
from: pytorch-fid / TTUR for the Frechet distance (float64, ``scipy.linalg.sqrtm``; where that root fails, as under
broken BLAS builds, the trace term from symmetric eigendecompositions), openai/improved-gan and ADM's
``evaluations/evaluator.py`` for the Inception Score (10 equal splits, or ADM's splits of 5,000 samples) and ADM's
``ManifoldEstimator`` (after Kynkaanniemi et al. 2019, k = 3) for precision and recall (distances in float32, or as
ADM's ``DistanceBlock``: float16, float32 for a block where they are not finite). Which variant a score uses is the
evaluation protocol's choice (``diffusion.evaluation.protocols``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from scipy import linalg

from diffusion.errors import InputError

ArrayLike = np.ndarray | torch.Tensor
ADM_TILE = 10_000  # ADM's ManifoldEstimator: row and column batches of its pairwise distances


@contextmanager
def full_precision() -> Iterator[None]:
    """No TF32 in CUDA convolutions and matmuls inside: features and distances do not depend on the trainer's TF32
    switch (``train.tf32``) or on cuDNN's default (TF32 convolutions). No effect on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _float64(features: ArrayLike) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D), got shape {x.shape}")
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian statistics and the Frechet distance


def statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (N, D) in float64: the mean and the unbiased covariance, as pytorch-fid computes them."""
    x = _float64(features)
    if len(x) < 2:
        raise InputError(f"statistics need at least 2 feature vectors, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


class RunningStatistics:
    """Mean and covariance accumulated batch by batch, for sets too large to hold (ImageNet's 1.28M training images)
    or drawn on many processes (FID during training).

    Keeps float64 sums of x and of x x^T on ``device``; :meth:`all_reduce` adds them over the processes of a
    ``torch.distributed`` run (every process must call it, also one that saw no batch), and :meth:`compute` gives
    (mu, sigma) as :func:`statistics` would for all the rows together (up to float64 rounding).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: ArrayLike) -> None:
        x = torch.as_tensor(features).to(self.sum.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != len(self.sum):
            raise ValueError(f"expected features (N, {len(self.sum)}), got {tuple(x.shape)}")
        self.count += len(x)
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for tensor in (self.count, self.sum, self.outer):
                torch.distributed.all_reduce(tensor)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self.count.item())
        if n < 2:
            raise InputError(f"statistics need at least 2 feature vectors, got {n}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6
                     ) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64 (Heusel et al. 2017).

    Wherever pytorch-fid and ADM's evaluator give a number, this is theirs bit for bit: ``scipy.linalg.sqrtm`` of the
    product; if that is not finite (a singular product, e.g. fewer samples than dimensions), ``eps * I`` added to both
    covariances; an imaginary part of the root below 1e-3 on its diagonal dropped as rounding noise. Where they fail --
    a root still not finite, or with a larger imaginary part, as scipy returns under some BLAS builds (an OpenBLAS
    ILP64 numpy/scipy: LightningDiT issue #97, FID 20.65 for 1.4) -- the trace of the root comes from symmetric
    eigendecompositions instead (:func:`trace_sqrt_product`), with a RuntimeWarning. Statistics holding NaN or inf,
    or a "covariance" with a clearly negative eigenvalue, are an InputError.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (_numpy(mu1), _numpy(mu2)))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (_numpy(sigma1), _numpy(sigma2)))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise InputError(f"statistics of different feature spaces: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{sigma1.shape} vs {sigma2.shape} (were both made with the same feature extractor?)")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, sigma1, sigma2)):
        raise InputError("the statistics hold NaN or inf values (NaN features, or a damaged statistics file?)")
    covmean, failure = _scipy_root(sigma1, sigma2, eps)
    if covmean is not None:
        tr_covmean = np.trace(covmean)
    else:
        tr_covmean = trace_sqrt_product(sigma1, sigma2, because=failure)  # refuses what is no covariance
        warnings.warn(f"scipy.linalg.sqrtm failed ({failure}; a broken BLAS build?): the Frechet distance's trace "
                      f"term comes from symmetric eigendecompositions instead", RuntimeWarning, stacklevel=2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _scipy_root(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> tuple[np.ndarray | None, str]:
    """(pytorch-fid's and ADM's real root of sigma1 sigma2, "") or, where theirs fails, (None, how it failed)."""
    try:
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    except (ValueError, np.linalg.LinAlgError) as err:
        return None, f"{type(err).__name__}: {err}"
    if not np.isfinite(covmean).all():
        return None, "a root that is not finite, with eps * I added too"
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return None, f"a root with an imaginary part of up to {np.abs(covmean.imag).max():.3g}"
        covmean = covmean.real
    return covmean, ""


def _torch_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, v = torch.linalg.eigh(torch.from_numpy(a))
    return w.numpy(), v.numpy()


def _zero_below_rounding(w: np.ndarray) -> np.ndarray:
    tolerance = len(w) * np.finfo(np.float64).eps * max(abs(w).max(), np.finfo(np.float64).tiny)
    return np.where(w > tolerance, w, 0.0)


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike, because: str = "") -> float:
    """tr((sigma1 sigma2)^(1/2)) of two covariances as the sum of sqrt(lambda_i), lambda the eigenvalues of the
    symmetric sqrt(sigma1) sigma2 sqrt(sigma1) (similar to sigma1 sigma2): symmetric eigendecompositions only, no
    general matrix root. Eigenvalues (of sigma1 and of that product) up to rounding of 0, D * machine epsilon times
    the largest, slightly negative ones included, count as 0: a rank-deficient covariance's zero directions add
    nothing, where the square root of their rounding noise would add about 1e-8 each.

    torch's LAPACK first (it is not the BLAS that numpy and scipy were built with), numpy's where that gives
    anything not finite. A matrix with an eigenvalue below -1e-6 times its largest is no covariance: InputError
    (``because``: why scipy's root was not used, for the message)."""
    s1, s2 = (np.asarray(_numpy(s), dtype=np.float64) for s in (sigma1, sigma2))
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # the symmetric part: what eigh reads
    for eigh in (_torch_eigh, np.linalg.eigh):
        try:
            w1, v1 = eigh(s1)
            w2 = eigh(s2)[0]
            if not (np.isfinite(w1).all() and np.isfinite(v1).all() and np.isfinite(w2).all()):
                continue
            for name, w in (("sigma1", w1), ("sigma2", w2)):
                if w.min() < -1e-6 * max(abs(w).max(), np.finfo(np.float64).tiny):
                    scipy = f" (scipy.linalg.sqrtm gave {because})" if because else ""
                    raise InputError(f"{name} is not a covariance matrix: it has the eigenvalue {w.min():.3g} "
                                     f"(largest {abs(w).max():.3g}){scipy}; NaN features or statistics from "
                                     f"different extractors?")
            root1 = (v1 * np.sqrt(_zero_below_rounding(w1))) @ v1.T
            product = root1 @ s2 @ root1
            lam = eigh((product + product.T) / 2)[0]
        except (RuntimeError, np.linalg.LinAlgError):  # torch's / numpy's "did not converge"
            continue
        if np.isfinite(lam).all():
            return float(np.sqrt(_zero_below_rounding(lam)).sum())
    raise InputError("the eigendecompositions of the covariances failed in torch's and numpy's LAPACK alike: the "
                     "linear-algebra libraries of this installation are broken")


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: ArrayLike, splits: int = 10, split_size: int = 0) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean prediction.

    ``logits`` (N, classes) are softmaxed in float64 (ADM: pool3 times the Inception's softmax weights, 1008 classes).
    ``split_size`` 0: ``splits`` equal parts, part i holding samples [i N / splits, (i + 1) N / splits), as
    openai/improved-gan. Else ADM's rule: parts of ``split_size`` samples from the start, the last one smaller when N
    is not a multiple (``range(0, N, split_size)``; 50K samples: the same ten parts). Uniform predictions give 1;
    confident predictions spread evenly over K classes give K.
    """
    x = _float64(logits)
    if split_size < 0:
        raise ValueError(f"split_size must be >= 0, got {split_size}")
    how, need = (f"in splits of {split_size}", 1) if split_size else (f"over {splits} splits", splits)
    if len(x) < need:
        raise InputError(f"the Inception Score {how} needs at least {need} samples, got {len(x)}")
    bounds = ([(s, s + split_size) for s in range(0, len(x), split_size)] if split_size else
              [(i * len(x) // splits, (i + 1) * len(x) // splits) for i in range(splits)])
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start, stop in bounds:
        part_p, part_log_p = p[start:stop], log_p[start:stop]
        log_marginal = np.log(part_p.mean(axis=0, keepdims=True))
        kl = np.where(part_p > 0, part_p * (part_log_p - log_marginal), 0.0).sum(axis=1)  # 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------------
# Precision and recall (k-nearest-neighbour manifolds)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances, clamped at 0 as ADM's DistanceBlock."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_(min=0)


def manifold_radii(features: torch.Tensor, k: int = 3, max_elements: int = 2**28) -> torch.Tensor:
    """Squared distance from every point to its k-th nearest neighbour in the same set (itself excluded), computed
    a block of rows at a time so that ``max_elements`` bounds the distance matrix held (50K x 50K fits)."""
    if len(features) <= k:
        raise InputError(f"a k = {k} nearest-neighbour manifold needs more than {k} points, got {len(features)}")
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    rows = max(1, max_elements // len(features))
    for start in range(0, len(features), rows):
        block = _squared_distances(features[start:start + rows], features)
        radii[start:start + rows] = block.kthvalue(k + 1, dim=1).values  # the smallest is the point itself
    return radii


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, max_elements: int
                     ) -> torch.Tensor:
    inside = torch.empty(len(points), dtype=torch.bool, device=points.device)
    rows = max(1, max_elements // len(centres))
    for start in range(0, len(points), rows):
        inside[start:start + rows] = (_squared_distances(points[start:start + rows], centres) <= radii[None]).any(1)
    return inside


@torch.no_grad()
def precision_recall(reference: ArrayLike, samples: ArrayLike, k: int = 3, device: torch.device | str = "cpu",
                     max_elements: int = 2**28, distances: str = "fp32", tile: int = ADM_TILE) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them on pool features.

    Each set spans a manifold: the union of balls around its points, each reaching its k-th nearest neighbour.
    Precision is the fraction of samples inside the reference manifold, recall the fraction of reference points
    inside the sample manifold. ``distances``: "fp32" computes them in float32 on ``device``, ``max_elements`` at a
    time (2**28: 1 GiB); "fp16" as ADM's ``DistanceBlock`` (:func:`adm_distances`), on ADM's ``tile`` x ``tile``
    blocks (its row and column batches of 10,000).
    """
    if distances not in ("fp32", "fp16"):
        raise ValueError(f"distances must be fp32 or fp16, got {distances!r}")
    ref = torch.as_tensor(_float64(reference), dtype=torch.float32, device=device)
    gen = torch.as_tensor(_float64(samples), dtype=torch.float32, device=device)
    if ref.shape[1] != gen.shape[1]:
        raise InputError(f"reference features are {ref.shape[1]}-d, sample features {gen.shape[1]}-d")
    with full_precision():
        if distances == "fp16":
            return _adm_precision_recall(ref, gen, k, tile)
        ref_radii, gen_radii = manifold_radii(ref, k, max_elements), manifold_radii(gen, k, max_elements)
        precision = _inside_any_ball(gen, ref, ref_radii, max_elements).double().mean().item()
        recall = _inside_any_ball(ref, gen, gen_radii, max_elements).double().mean().item()
    return precision, recall


# ADM's precision/recall: float16 distances on blocks of 10,000 x 10,000


def adm_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ADM's ``DistanceBlock`` on one block: float32 features cast to float16, squared norms, the product and
    ``max(|a|^2 - 2 a.b + |b|^2, 0)`` each rounded to float16, returned as float32; if any of the block's distances
    is not finite (float16 overflows past 65504), the whole block in float32 (:func:`_squared_distances`).

    Sums and the matrix product accumulate in float32, as TensorFlow's float16 reductions and GPU matmuls do: the
    product of the float16 values is taken in float32 (exact products, float32 sums; no TF32) and rounded once, the
    same on every device (a native float16 matmul differs only in the summation order, and is slow on CPUs)."""
    a16, b16 = a.half(), b.half()
    product = (a16.float() @ b16.float().T).half()
    block = ((a16 * a16).sum(1, keepdim=True) - 2 * product + (b16 * b16).sum(1)[None]).clamp_(min=0)
    if not torch.isfinite(block).all():
        return _squared_distances(a, b)
    return block.float()


def _blocks(n: int, size: int) -> list[slice]:
    if size < 1:
        raise ValueError(f"the block size must be positive, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def adm_manifold_radii(features: torch.Tensor, k: int = 3, tile: int = ADM_TILE) -> torch.Tensor:
    """ADM's ``manifold_radii``: the (k + 1)-th smallest :func:`adm_distances` of every point to the set (itself
    included, as it is the smallest), over ``tile`` x ``tile`` blocks, keeping the k + 1 smallest of each row."""
    if len(features) <= k:
        raise InputError(f"a k = {k} nearest-neighbour manifold needs more than {k} points, got {len(features)}")
    radii = torch.empty(len(features), dtype=torch.float32, device=features.device)
    for rows in _blocks(len(features), tile):
        nearest = torch.cat([adm_distances(features[rows], features[cols]).topk(
            min(k + 1, cols.stop - cols.start), dim=1, largest=False).values
            for cols in _blocks(len(features), tile)], dim=1)
        radii[rows] = nearest.kthvalue(k + 1, dim=1).values
    return radii


def _adm_precision_recall(ref: torch.Tensor, gen: torch.Tensor, k: int, tile: int) -> tuple[float, float]:
    """ADM's ``evaluate_pr``: reference blocks as rows, sample blocks as columns, each block's distances compared
    with both sets' radii."""
    ref_radii, gen_radii = adm_manifold_radii(ref, k, tile), adm_manifold_radii(gen, k, tile)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    gen_in = torch.zeros(len(gen), dtype=torch.bool, device=gen.device)
    for rows in _blocks(len(ref), tile):
        for cols in _blocks(len(gen), tile):
            block = adm_distances(ref[rows], gen[cols])
            ref_in[rows] |= (block <= gen_radii[cols][None]).any(1)
            gen_in[cols] |= (block <= ref_radii[rows][:, None]).any(0)
    return gen_in.double().mean().item(), ref_in.double().mean().item()
