"""The likelihood through the probability-flow ODE (SiT's sample_ode_likelihood): diffusion.samplers.transport's
likelihood_ode and Transport.likelihood, on Gaussian data whose exact linear-path velocity and density are known."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.objectives.transport import build_transport
from diffusion.samplers.transport import bits_per_dim, drift_divergence, likelihood_ode, ode_grid, prior_logp
from diffusion.sampling.per_sample import PerSampleNoise

SHAPE = (1, 2, 2)  # D = 4 dimensions per sample
D = 4


class Gaussian:
    """Data x1 ~ N(mu, cov) on the linear path x_t = t x1 + (1 - t) x0. With cov = Q diag(lam) Q^T the exact velocity
    E[x1 - x0 | x_t = x] is mu + A(t) (x - t mu), A(t) = Q diag((t lam - (1 - t)) / (t^2 lam + (1 - t)^2)) Q^T
    (Cov(x1 - x0, x_t) Var(x_t)^-1, all functions of cov), and its flow maps x0 to mu + cov^(1/2) x0."""

    def __init__(self, cov: torch.Tensor, mu: torch.Tensor):
        self.cov, self.mu = cov.double(), mu.double()
        self.lam, self.q = torch.linalg.eigh(self.cov)

    def matrix(self, diag: torch.Tensor) -> torch.Tensor:  # Q diag(.) Q^T, batched over diag's first dimension
        return self.q @ torch.diag_embed(diag) @ self.q.T

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, 1).to(x)
        if (tt == tt[0]).all():  # the samplers' case: one time for the whole batch, one matrix
            tt = tt[:1]
        a = self.matrix((tt * self.lam - (1 - tt)) / (tt**2 * self.lam + (1 - tt) ** 2))
        flat = x.reshape(x.shape[0], -1) - tt * self.mu
        return (self.mu + (a @ flat.unsqueeze(-1)).squeeze(-1)).reshape(x.shape)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributions.MultivariateNormal(self.mu, self.cov)
        return dist.log_prob(x.reshape(x.shape[0], -1))

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1) - self.mu
        return (flat @ self.matrix(self.lam.rsqrt())).reshape(x.shape)

    def draw(self, n: int, seed: int) -> torch.Tensor:
        x0 = torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (self.mu + x0 @ self.matrix(self.lam.sqrt())).reshape(n, *SHAPE)


def correlated() -> Gaussian:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(D, D, generator=g, dtype=torch.float64)
    return Gaussian(m @ m.T / D + 0.2 * torch.eye(D, dtype=torch.float64), torch.randn(D, generator=g) * 1.5)


def randn_from(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


REVERSE = ode_grid(1.0, 0.0, 2).double()  # data (t = 1) to noise (t = 0)


def test_exact_divergence_recovers_the_gaussian_log_density():
    data = correlated()
    x = data.draw(16, seed=1)
    sit, _, _ = likelihood_ode(data.velocity, x, REVERSE, divergence="exact")  # SiT's atol 1e-6, rtol 1e-3
    assert (sit - data.log_density(x)).abs().max().item() < 5e-2
    logp, z, delta = likelihood_ode(data.velocity, x, REVERSE, divergence="exact", atol=1e-8, rtol=1e-5)
    assert (logp - data.log_density(x)).abs().max().item() < 1e-3
    assert (z - data.whiten(x)).abs().max().item() < 1e-3  # the reverse flow is the whitening map
    assert torch.allclose(logp, prior_logp(z) - delta)
    tight, _, _ = likelihood_ode(data.velocity, x, REVERSE, divergence="exact", atol=1e-10, rtol=1e-10)
    assert (tight - data.log_density(x)).abs().max().item() < 1e-7
    heun, _, _ = likelihood_ode(data.velocity, x, ode_grid(1.0, 0.0, 201).double(), method="heun2",
                                divergence="exact")
    assert (heun - data.log_density(x)).abs().max().item() < 1e-3


def test_exact_divergence_is_the_trace_of_the_jacobian():
    data = correlated()
    x, t = data.draw(3, seed=2), torch.full((3,), 0.3, dtype=torch.float64)
    v, div = drift_divergence(data.velocity, x, t)
    lam = data.lam
    trace = ((0.3 * lam - 0.7) / (0.09 * lam + 0.49)).sum()
    assert torch.allclose(div, trace.expand(3)) and torch.equal(v, data.velocity(x, t))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """One data point, one probe per row: the rows' mean is the exact log-likelihood within Monte-Carlo error."""
    data = correlated()
    n = 1024
    x = data.draw(1, seed=3).expand(n, *SHAPE).contiguous()
    logp, _, _ = likelihood_ode(data.velocity, x, REVERSE, probe=probe, randn=randn_from(4), atol=1e-6, rtol=1e-6)
    exact = data.log_density(x[:1]).item()
    assert logp.std().item() > 1e-2  # a correlated covariance: the estimate does vary
    assert abs(logp.mean().item() - exact) < 4 * logp.std().item() / math.sqrt(n)
    many, _, _ = likelihood_ode(data.velocity, x[:64], REVERSE, probe=probe, probes=16, randn=randn_from(5),
                                atol=1e-6, rtol=1e-6)
    assert many.std().item() < logp.std().item() / 2  # 16 probes: a quarter of the standard deviation


def test_resampled_probes_as_sit():
    """SiT's way: one fresh Rademacher probe per network evaluation, averaging over the trajectory."""
    data = correlated()
    n = 256
    x = data.draw(1, seed=3).expand(n, *SHAPE).contiguous()
    draws, evals, stream = [], [], randn_from(11)

    def randn(x):
        draws.append(x.shape)
        return stream(x)

    def velocity(x, t):
        evals.append(t[0].item())
        return data.velocity(x, t)

    fresh, _, _ = likelihood_ode(velocity, x, REVERSE, resample_probes=True, randn=randn)
    fixed, _, _ = likelihood_ode(data.velocity, x, REVERSE, randn=randn_from(11))
    assert len(draws) == len(evals) > 2
    exact = data.log_density(x[:1]).item()
    assert fresh.std().item() < fixed.std().item() / 2
    assert abs(fresh.mean().item() - exact) < 4 * fresh.std().item() / math.sqrt(n) + 5e-2  # + SiT's tolerances


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    data = Gaussian(torch.diag(torch.tensor([0.25, 0.5, 1.0, 2.0])), torch.tensor([1.5, 0.0, -1.0, 0.5]))
    x = data.draw(8, seed=6)
    logp, _, _ = likelihood_ode(data.velocity, x, REVERSE, randn=randn_from(7))
    exact, _, _ = likelihood_ode(data.velocity, x, REVERSE, divergence="exact")
    assert torch.allclose(logp, exact, rtol=0, atol=1e-9)
    assert (logp - data.log_density(x)).abs().max().item() < 1e-2  # SiT's tolerances


def test_bits_per_dim_by_hand():
    logp = torch.tensor([-3 * D * math.log(2), 0.0])
    assert torch.allclose(bits_per_dim(logp, D), torch.tensor([3.0, 0.0]))
    assert torch.allclose(bits_per_dim(logp, D, levels=256), torch.tensor([10.0, 7.0]))  # 8-bit data in [-1, 1]
    assert torch.allclose(bits_per_dim(logp, D, levels=256, data_range=1.0), torch.tensor([11.0, 8.0]))  # [0, 1]


def test_transport_likelihood_and_per_sample_probes():
    """Transport.likelihood on a velocity network (2C channels, SiT's learn_sigma: the first C are used), with
    per-sample probes: sample i's result depends only on (seed, i), not on its batch."""
    data = correlated()
    x = data.draw(4, seed=8)
    calls = []

    def model(x, t, y):
        calls.append(y)
        v = data.velocity(x, t)
        return torch.cat([v, torch.full_like(v, 1e6)], 1)

    transport = build_transport("linear", "velocity")
    logp, bpd = transport.likelihood(model, x, {"y": "label"}, divergence="exact", atol=1e-8, rtol=1e-5)
    assert (logp - data.log_density(x)).abs().max().item() < 1e-3 and set(calls) == {"label"}
    assert torch.allclose(bpd, -logp / (D * math.log(2)))
    kwargs = dict(sampler="heun2", steps=41)
    full, _ = transport.likelihood(model, x, {"y": 0}, randn=PerSampleNoise(9, [0, 1, 2, 3]), **kwargs)
    part, _ = transport.likelihood(model, x[[3, 1]], {"y": 0}, randn=PerSampleNoise(9, [3, 1]), **kwargs)
    assert torch.allclose(part, full[[3, 1]], rtol=0, atol=1e-10)
    other, _ = transport.likelihood(model, x[[3, 1]], {"y": 0}, randn=PerSampleNoise(10, [3, 1]), **kwargs)
    assert not torch.allclose(other, part)


def test_likelihood_errors():
    data = correlated()
    x = data.draw(2, seed=9)
    for kwargs in [dict(divergence="trace"), dict(probe="uniform"), dict(probes=0), dict(method="rk45")]:
        with pytest.raises(ValueError):
            likelihood_ode(data.velocity, x, REVERSE, **kwargs)
    with pytest.raises(ValueError):
        build_transport("linear", "velocity").likelihood(lambda x, t: x, x, {}, steps=1)


@pytest.mark.parametrize("method, steps, tol", [("midpoint", 101, 1e-3), ("heun3", 41, 1e-3), ("rk4", 21, 1e-3),
                                                ("bosh3", 2, 1e-3), ("dopri8", 2, 1e-3)])
def test_other_ode_methods_recover_the_gaussian_log_density(method, steps, tol):
    """torchdiffeq's other methods (diffusion.samplers.transport.ODE_METHODS) on the augmented (x, delta) state,
    fixed-step ones on the grid, adaptive ones with tolerances: the exact log density."""
    data = correlated()
    x = data.draw(8, seed=12)
    logp, _, _ = likelihood_ode(data.velocity, x, ode_grid(1.0, 0.0, steps).double(), method=method,
                                divergence="exact", atol=1e-8, rtol=1e-6)
    assert (logp - data.log_density(x)).abs().max().item() < tol


def test_resampled_per_sample_probes_do_not_depend_on_the_batch():
    """resample_probes with PerSampleNoise and a fixed-step solver: sample i's fresh probe at every evaluation still
    comes from its own stream, so its estimate is the same in any batch, and differs from the fixed-probe one."""
    data = correlated()
    x = data.draw(4, seed=13)
    transport = build_transport("linear", "velocity")

    def model(x, t):
        return data.velocity(x, t)

    kwargs = dict(sampler="heun2", steps=11, resample_probes=True)
    full, _ = transport.likelihood(model, x, {}, randn=PerSampleNoise(9, [0, 1, 2, 3]), **kwargs)
    part, _ = transport.likelihood(model, x[[2, 0]], {}, randn=PerSampleNoise(9, [2, 0]), **kwargs)
    assert torch.allclose(part, full[[2, 0]], rtol=0, atol=1e-10)
    fixed, _ = transport.likelihood(model, x, {}, randn=PerSampleNoise(9, [0, 1, 2, 3]), sampler="heun2", steps=11)
    assert (fixed - full).abs().min().item() > 1e-6


def test_sample_py_resample_probes_flag_is_used_and_recorded(tmp_path):
    """sample.py --likelihood --resample_probes: what Transport.likelihood gives with resample_probes, recorded in
    the JSON report (false without the flag) and said in the summary; refused without --likelihood and with the
    exact divergence; a fixed-step solver refuses tolerances and records none."""
    from tests.helpers import TINY_DIT
    from tests.test_likelihood import LABELS, SEED, direct, report, run_main, save_run, write_npz

    save_run(tmp_path / "run", "configs/digits_sit.py", *TINY_DIT)
    pixels = write_npz(tmp_path / "data.npz", rgb=True)
    base = ["--ckpt", tmp_path / "run", f"--likelihood={tmp_path / 'data.npz'}", "--sampler=heun2", "--steps=3",
            f"--seed={SEED}"]
    results = {}
    for name, flags in (("fresh", ["--resample_probes"]), ("fixed", [])):
        code, summary, err = run_main(*base, *flags, f"--out={tmp_path / name}.json")
        assert code == 0, err
        results[name] = report(tmp_path / f"{name}.json")
        if name == "fresh":
            assert "Hutchinson divergence (1 rademacher probe) resampled at every evaluation" in summary
    assert results["fresh"]["settings"]["resample_probes"] is True
    assert results["fixed"]["settings"]["resample_probes"] is False
    assert "atol" not in results["fresh"]["settings"]  # heun2 takes the grid, not tolerances
    want = direct(tmp_path / "run", pixels, LABELS, SEED, sampler="heun2", steps=3, resample_probes=True)
    fresh = torch.tensor(results["fresh"]["per_sample"], dtype=torch.float64)
    torch.testing.assert_close(fresh, want, rtol=1e-5, atol=0)
    assert (fresh - torch.tensor(results["fixed"]["per_sample"], dtype=torch.float64)).abs().max() > 1e-4
    for argv, message in [(["--ckpt", tmp_path / "run", "--resample_probes"], "belong to --likelihood"),
                          ([*base, "--resample_probes", "--divergence=exact"], "--divergence=exact draws no probes"),
                          ([*base, "--atol=1e-5"], "--atol is a tolerance of the adaptive ODE methods")]:
        code, _, err = run_main(*argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
