"""Autoguidance (Karras et al. 2024): out_guide + w (out_main - out_guide) for every sampler family, the guide on the
main model's conditioning and only inside the guidance interval; sample.py's --guide: world-size-free guided jobs,
the guide in the job record, and guides from another space refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.config.cli import parse_command_line
from diffusion.config.loading import load_config
from diffusion.objectives.guidance import guided_model
from diffusion.registry import build_model, build_objective
from diffusion.sampling.per_sample import PerSampleNoise
from tests.helpers import REPO, TINY_MODEL, launch_script, make_tiny_autoencoder, run_sample

LABELS = torch.tensor([0, 1, 2, 1])
W = 2.5


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction for data N(mu_y, s^2 I) under x = alpha x0 + sigma eps with alpha = cos(pi u / 2),
    sigma = sin(pi u / 2), u = t / ``t_scale`` (clamped to a sliver inside (0, 1)); ``extra`` constant channels after
    the eps ones (a learned variance). ``flip``: u = 1 - t / t_scale (noise at t = 0, as the transport time).
    Records every call's (t, labels)."""

    def __init__(self, means, std: float, t_scale: float, extra: float | None = None, flip: bool = False):
        super().__init__()
        self.means, self.var, self.t_scale, self.extra, self.flip = means.double(), std**2, t_scale, extra, flip
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t.detach().clone(), y.clone()))
        u = (t.double() / self.t_scale).clamp(1e-3, 1 - 1e-3).view(-1, 1, 1, 1)
        u = 1 - u if self.flip else u
        alpha, sigma = torch.cos(torch.pi * u / 2), torch.sin(torch.pi * u / 2)
        mu = self.means[y].view(len(y), -1, 1, 1)
        eps = sigma * (x - alpha * mu) / (alpha**2 * self.var + sigma**2)
        if self.extra is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self.extra)], dim=1)


class Explicit(torch.nn.Module):
    """D_guide + w (D_main - D_guide) on the first ``guided`` channels, the rest the main's: the formula, by hand."""

    def __init__(self, main, guide, scale: float, guided: int):
        super().__init__()
        self.main, self.guide, self.scale, self.guided = main, guide, scale, guided

    def forward(self, x, t, y):
        m, g = self.main(x, t, y=y), self.guide(x, t, y=y)
        k = self.guided
        return torch.cat([g[:, :k] + self.scale * (m[:, :k] - g[:, :k]), m[:, k:]], dim=1)


def pair(t_scale: float, extra: tuple | None = None, flip: bool = False, channels: int = 2):
    gen = torch.Generator().manual_seed(0)
    main_means, guide_means = torch.randn(10, channels, generator=gen), torch.randn(10, channels, generator=gen)
    main = GaussianDenoiser(main_means, 0.5, t_scale, extra and extra[0], flip)
    guide = GaussianDenoiser(guide_means, 0.9, t_scale, extra and extra[1], flip)
    return main, guide


def run_sampler(objective, net, noise, options, guide=None, scale: float = W):
    randn = PerSampleNoise(3, range(len(noise)))  # the same draws for both runs
    return objective.sample(net, noise.clone(), {"y": LABELS}, null_cond={"y": torch.full_like(LABELS, 9)},
                            guidance_scale=scale, randn=randn, guide=guide, **options)


FAMILIES = {  # objective config, network time scale, the network's own time direction, samplers with options
    "vp": ("configs/digits_uvit.py", 999.0, False, {
        "dpm_solver++2m": {"steps": 5}, "ddim": {"steps": 5, "eta": 0.5}, "euler_maruyama": {"steps": 6}}),
    "iddpm": ("configs/digits_dit.py", 1000.0, False, {
        "ddpm": {"steps": 5}, "ddim": {"steps": 5, "guidance_channels": "1"}}),
    "transport": ("configs/digits_sit.py", 1.0, True, {
        "euler": {"steps": 6}, "sde_euler": {"steps": 6}, "repa_euler": {"steps": 5}, "repa_heun": {"steps": 5},
        "repa_sde": {"steps": 6}, "jit_heun": {"steps": 4}}),
    # a network trained in REPA's time (t = 0 data): main and guide both seen through ReversedTime
    "transport_repa_time": ("configs/digits_sit.py", 1.0, False, {
        "euler": {"steps": 6}, "repa_heun": {"steps": 5}, "repa_sde": {"steps": 6}}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_autoguided_samplers_equal_the_formula_on_gaussian_denoisers(family):
    """Each sampler with the guide equals the same sampler on a network computing D_g + w (D_m - D_g) (fp64, exact),
    the guide sees the samples' own labels (never the null label), and CFG would give something else."""
    config, t_scale, flip, samplers = FAMILIES[family]
    cfg = load_config(REPO / config)
    if family == "transport_repa_time":
        cfg.diffusion.time_direction = "repa"
    objective = build_objective(cfg.diffusion)
    extra = (0.3, -0.4) if family == "iddpm" else None  # iddpm's learned-variance channels: the main's
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sampler, options in samplers.items():
        main, guide = pair(t_scale, extra, flip)
        options = {"sampler": sampler, **options}
        guided = int(options.get("guidance_channels", "2").replace("all", "2"))
        out = run_sampler(objective, main, noise, options, guide=guide)
        assert guide.calls and all(torch.equal(y, LABELS) for _, y in guide.calls), sampler
        assert len(main.calls) == len(guide.calls), sampler  # no interval: every evaluation guided
        formula = run_sampler(objective, Explicit(*pair(t_scale, extra, flip), W, guided), noise, options, scale=1.0)
        assert out.dtype == torch.float64 and torch.equal(out, formula), sampler
        cfg_out = run_sampler(objective, pair(t_scale, extra, flip)[0], noise, options)  # CFG on the null label
        assert (out - cfg_out).abs().max() > 1e-3, sampler


def test_guided_model_one_call_and_its_switches():
    """One evaluation: the formula on the guided channels, the rest from the main model; w = 1 never calls the guide;
    outside the interval a plain main forward."""
    main, guide = pair(1.0, extra=(0.3, -0.4), flip=True)
    x, t = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.full((4,), 0.4)
    net = guided_model(main, {"y": LABELS}, None, W, eps_channels=2, channels="1", guide=guide)
    m, g = main(x, t, y=LABELS), guide(x, t, y=LABELS)
    out = net(x, t)
    assert torch.equal(out[:, :1], g[:, :1] + W * (m[:, :1] - g[:, :1])) and torch.equal(out[:, 1:], m[:, 1:])
    guide.calls.clear()
    assert torch.equal(guided_model(main, {"y": LABELS}, None, 1.0, 2, guide=guide)(x, t), m) and not guide.calls
    window = guided_model(main, {"y": LABELS}, None, W, 2, interval=(0.5, 0.9), guide=guide)
    assert torch.equal(window(x, t), m) and not guide.calls


@pytest.mark.parametrize("sampler", ["euler", "sde_euler", "repa_euler"])
def test_the_guidance_interval_holds_for_the_guide(sampler):
    """transport / REPA: the guide is called only at times inside [guidance_t_lo, guidance_t_hi]; the other steps
    are plain main evaluations."""
    objective = build_objective(load_config(REPO / "configs/digits_sit.py").diffusion)
    main, guide = pair(1.0, flip=True)
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    run_sampler(objective, main, noise, {"sampler": sampler, "steps": 11, "guidance_t_lo": 0.3,
                                         "guidance_t_hi": 0.7}, guide=guide)
    times = [float(t.reshape(-1)[0]) for t, _ in guide.calls]
    assert times and all(0.3 - 1e-9 <= s <= 0.7 + 1e-9 for s in times), times
    assert len(main.calls) > len(guide.calls)


# ----------------------------------------------------------------------------------------------------------
# sample.py --guide
# ----------------------------------------------------------------------------------------------------------

DIT = [f"--config={REPO / 'configs/digits_dit.py'}", *TINY_MODEL["dit"]]
JOB = ["--sampler=ddpm", "--steps=5", "--guidance=2.0", "--n_samples=6", "--chunk_size=2", "--seed=5"]
GUIDE_CONFIG = '''from pathlib import Path

from diffusion.config.loading import load_config


def get_config():
    config = load_config(Path({base!r}))
    config.model.update(hidden_size=16, depth=1, num_heads=2)
{changes}
    return config
'''


def write_weights(folder: Path, name: str, config, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(config.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # DiT zero-inits its output layer: random weights make every network matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = folder / name
    torch.save(model.state_dict(), path)
    return path


def guide_files(folder: Path, name: str, changes: str = "") -> tuple[Path, Path]:
    """(weights, config) of a small DiT guide: digits_dit.py at width 16 and depth 1, with ``changes``."""
    config_path = folder / f"{name}.py"
    config_path.write_text(GUIDE_CONFIG.format(base=str(REPO / "configs/digits_dit.py"), changes=changes or ""))
    return write_weights(folder, f"{name}.pt", load_config(config_path), seed=7), config_path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("autoguidance")
    main = write_weights(folder, "main.pt", parse_command_line(DIT)[0], seed=1)
    return folder, main, *guide_files(folder, "guide")


def npz(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data}


def test_guided_job_is_world_size_free_recorded_and_not_resumed_with_another_guide(tmp_path, files):
    folder, main, guide, guide_config = files
    job = ["--ckpt", main, *DIT, *JOB, f"--guide={guide}", f"--guide_config={guide_config}"]
    code, out, err = run_sample(*job, "--batch_size=3", f"--out={tmp_path / 'a.npz'}")
    assert code == 0, err
    assert f"by the guide {guide.name}" in out
    record = json.loads((tmp_path / "a.job.json").read_text())["settings"]
    assert record["guide"] == {"checkpoint": str(guide.resolve()), "weights": "EMA"}
    assert "guide" not in record["sampler"]  # a network, not a sampler keyword
    proc = launch_script(2, "sample.py", [*map(str, job), "--batch_size=2", f"--out={tmp_path / 'b.npz'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = npz(tmp_path / "a.npz"), npz(tmp_path / "b.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])

    code, _, err = run_sample("--ckpt", main, *DIT, *JOB, f"--out={tmp_path / 'c.npz'}")  # CFG
    assert code == 0, err
    assert json.loads((tmp_path / "c.job.json").read_text())["settings"]["guide"] == ""
    assert not np.array_equal(npz(tmp_path / "c.npz")["arr_0"], a["arr_0"])  # the guide decides the samples
    record = json.loads((tmp_path / "c.job.json").read_text())
    del record["settings"]["guide"]  # a record written before autoguidance: read as CFG, so it still matches
    (tmp_path / "c.job.json").write_text(json.dumps(record))
    code, out, err = run_sample("--ckpt", main, *DIT, *JOB, f"--out={tmp_path / 'c.npz'}")
    assert code == 0 and "already complete" in out, err

    other = shutil.copy(guide, folder / "other_guide.pt")
    (tmp_path / "a.npz").unlink()  # an unfinished job: its record stays
    code, _, err = run_sample(*job[:-2], f"--guide={other}", f"--guide_config={guide_config}",
                              f"--out={tmp_path / 'a.npz'}")
    assert code == 2 and "changed: guide.checkpoint" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_sample("--ckpt", main, *DIT, *JOB, f"--out={tmp_path / 'a.npz'}")
    assert code == 2 and "changed: guide" in err, err


@pytest.mark.parametrize(("changes", "message"), [
    ("    config.model.update(input_size=16)", "inputs of shape (1, 16, 16), the model (1, 8, 8)"),
    ("    config.autoencoder.pretrained = 'stabilityai/sd-vae-ft-ema'", "it samples latents, the model pixels"),
    ("    config.diffusion.num_steps = 500", "another objective (diffusion.num_steps 500 there, 1000 here)"),
    ("    config.diffusion.learn_sigma = False\n    config.model.learn_sigma = False", "diffusion.learn_sigma False"),
    ("    config.model.update(num_classes=5)", "conditioned on 5 class labels, the model on 10 class labels"),
], ids=["input_shape", "autoencoder", "schedule", "prediction", "labels"])
def test_a_guide_from_another_space_is_refused_in_one_line(tmp_path, files, changes, message):
    folder, main = files[:2]
    guide, guide_config = guide_files(tmp_path, "bad", changes)
    code, _, err = run_sample("--ckpt", main, *DIT, *JOB, f"--guide={guide}", f"--guide_config={guide_config}",
                              f"--out={tmp_path / 'x.npz'}")
    assert code == 2 and message in err and "does not live in the model's space" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_guide_flags_that_cannot_work_are_refused(tmp_path, files):
    folder, main, guide, guide_config = files
    code, _, err = run_sample("--ckpt", main, *DIT, f"--guide={guide}", f"--out={tmp_path / 'x.png'}")
    assert code == 2 and "--guide_config" in err, err
    code, _, err = run_sample("--ckpt", main, *DIT, f"--guide_config={guide_config}", f"--out={tmp_path / 'x.png'}")
    assert code == 2 and "set sample.guide" in err, err


def test_autoencoders_compare_by_their_encoder_weights(tmp_path):
    """Other names: the same encoder weights share a latent space (only the decoder may differ), others do not."""
    from diffusion.sampling.loader import _autoencoder_mismatch

    first = make_tiny_autoencoder(tmp_path / "vae_a", seed=0)
    same = shutil.copytree(first, tmp_path / "vae_copy")
    other = make_tiny_autoencoder(tmp_path / "vae_b", seed=1)
    section = load_config(REPO / "configs/digits_uvit.py").autoencoder
    sections = {}
    for name, path in (("first", first), ("same", same), ("other", other)):
        sections[name] = section.copy_and_resolve_references()
        sections[name].pretrained = str(path)
    assert _autoencoder_mismatch(sections["first"], sections["same"]) == ""
    assert "other encoder weights" in _autoencoder_mismatch(sections["first"], sections["other"])
    scaled = sections["same"].copy_and_resolve_references()
    scaled.scale_factor = 0.5
    assert "scale_factor" in _autoencoder_mismatch(sections["first"], scaled)


# ----------------------------------------------------------------------------------------------------------
# In-training FID
# ----------------------------------------------------------------------------------------------------------


def test_fid_during_training_is_autoguided_by_sample_guide(tmp_path):
    """sample.guide set in a training config: the guide is loaded once and its scores are those of autoguided
    samples (the same score as a TrainingFID with the guide gives afterwards; not the CFG score)."""
    from diffusion.evaluation.training import TrainingFID
    from diffusion.registry import describe
    from diffusion.sampling.loader import load_for_sampling
    from diffusion.training.loop import train
    from tests.helpers import tiny_config

    run = ["--config.train.steps=2", "--config.train.ckpt_every=2", "--config.sample.steps=4"]
    train(tiny_config(*run, "--config.model.depth=1"), tmp_path / "guide")
    scored = [*run, "--config.eval.every=2", "--config.eval.n_samples=20", "--config.eval.batch_size=20",
              "--config.eval.feature_extractor=digits"]
    final = train(tiny_config(*scored, f"--config.sample.guide={tmp_path / 'guide'}"), tmp_path / "main")
    logged = json.loads((tmp_path / "main" / "fid.json").read_text())["scores"]["2"]
    assert "by the guide step_00000002" in (tmp_path / "main" / "log.txt").read_text()
    ready = load_for_sampling(final, codecs=False)
    assert ready.guide is not None and ready.guide_source.parent.parent == (tmp_path / "guide").resolve()

    def score(config) -> float:
        fid = TrainingFID(config, tmp_path / "check", state=None, device="cpu", objective=ready.objective,
                          shape=ready.image_shape, info=describe(ready.model))
        return fid(ready.model, 20)

    assert score(ready.config) == pytest.approx(logged, rel=1e-6)
    ready.config.sample.guide = ""
    assert abs(score(ready.config) - logged) > 1e-3  # CFG gives another score
