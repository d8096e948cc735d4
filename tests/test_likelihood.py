"""sample.py --likelihood=DATA.npz (diffusion.sampling.likelihood): bits/dim of an ADM-format .npz under a transport
checkpoint, checked against Transport.likelihood called directly on the same dequantised data and probes, the same
for any batch size; pixel, unconditional and latent models; every refusal."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

import sample
from diffusion.checkpoint import save_checkpoint
from diffusion.config.cli import parse_command_line
from diffusion.registry import build_model
from diffusion.sampling.likelihood import DATA_STREAM, dequantize
from diffusion.sampling.loader import load_for_sampling
from diffusion.sampling.per_sample import PerSampleNoise, index_seed
from tests.helpers import REPO, TINY_DIT, TINY_MODEL, make_tiny_autoencoder

N, SEED = 4, 5
LABELS = [3, 1, 4, 1]
FAST = ["--sampler=heun2", "--steps=3"]  # 2 Heun steps: 4 network evaluations


def run_main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sample.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def save_run(folder, config: str, *overrides) -> torch.nn.Module:
    """A tiny randomly perturbed backbone (DiT zero-inits its output: the velocity would be 0) saved as a trainer
    checkpoint of ``config`` with ``overrides``; returns the network."""
    cfg, _ = parse_command_line([f"--config={REPO / config}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    state = model.state_dict()
    save_checkpoint(folder, 1, model_state=state, ema_state=state, config=cfg, meta={}, train_state={})
    return model


def write_npz(path, shape=(8, 8, 1), labels=LABELS, rgb=False, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (N, *shape), dtype=np.uint8)
    stored = np.repeat(pixels, 3, axis=-1) if rgb else pixels  # sample.py writes grey samples as RGB
    np.savez(path, stored, *([] if labels is None else [np.array(labels)]))
    return pixels


@pytest.fixture(scope="module")
def sit(tmp_path_factory):
    """(run dir, uint8 grey digits-sized images (N, 8, 8, 1), their .npz written as RGB with labels)."""
    root = tmp_path_factory.mktemp("sit")
    save_run(root / "run", "configs/digits_sit.py", *TINY_DIT)
    pixels = write_npz(root / "data.npz", rgb=True)
    return root / "run", pixels, root / "data.npz"


def report(path) -> dict:
    return json.loads(path.read_text())


def direct(run, pixels: np.ndarray, labels, seed: int, **kwargs) -> torch.Tensor:
    """Transport.likelihood itself on (x + u) / 256 * 2 - 1, u from each sample's (seed, index) stream, with every
    sample's probes from PerSampleNoise: what the command must compute."""
    ready = load_for_sampling(run)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).double()
    u = torch.stack([torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(index_seed(seed, i, DATA_STREAM)))
                     for i in range(len(x))])
    data = ((x + u.double()) / 256 * 2 - 1).float()
    assert torch.equal(data, dequantize(torch.from_numpy(pixels).permute(0, 3, 1, 2), seed, range(len(x))))
    cond = {} if labels is None else {"y": torch.tensor(labels)}
    _, bpd = ready.objective.likelihood(ready.model, data, cond, levels=256, data_range=2.0,
                                        randn=PerSampleNoise(seed, range(len(x))), **kwargs)
    return bpd.double()


def test_cli_computes_transport_likelihood_for_any_batch_size(tmp_path, sit):
    run, pixels, data = sit
    outs = {}
    for batch in (1, 3):
        outs[batch] = tmp_path / f"b{batch}.json"
        code, summary, err = run_main("--ckpt", run, f"--likelihood={data}", f"--out={outs[batch]}", *FAST,
                                      "--divergence=exact", f"--batch_size={batch}", f"--seed={SEED}")
        assert code == 0, err
    result = report(outs[3])
    per_sample = torch.tensor(result["per_sample"], dtype=torch.float64)
    want = direct(run, pixels, LABELS, SEED, sampler="heun2", steps=3, divergence="exact")
    torch.testing.assert_close(per_sample, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(report(outs[1])["per_sample"], dtype=torch.float64), per_sample,
                               rtol=1e-5, atol=0)
    assert torch.isfinite(per_sample).all() and 5 < per_sample.mean() < 20 and per_sample.std() > 1e-3
    assert result["n"] == N and math.isclose(result["bits_per_dim"], per_sample.mean().item(), rel_tol=1e-9)
    assert math.isclose(result["stderr"], per_sample.std().item() / math.sqrt(N), rel_tol=1e-6)
    assert result["ckpt"] == str(run / "checkpoints" / "step_00000001")
    settings = result["settings"]
    assert (settings["sampler"], settings["steps"], settings["divergence"], settings["seed"]) == \
        ("heun2", 3, "exact", SEED) and "8-bit grid" in settings["space"]
    assert f"{result['bits_per_dim']:.4f} ± {result['stderr']:.4f} bits/dim (N={N}" in summary
    assert "heun2 (3 grid points), exact divergence" in summary and "likelihood" in err  # the progress bar


def test_hutchinson_probes_are_per_sample(tmp_path, sit):
    """Two Gaussian probes per sample from (seed, index): batch 1 and 3 agree and equal the direct call; another seed
    changes the dequantisation and the probes."""
    run, pixels, data = sit
    flags = [*FAST, "--probes=2", "--probe=gaussian", "--n_samples=3"]
    results = []
    for batch, seed in ((1, SEED), (3, SEED), (3, SEED + 1)):
        out = tmp_path / f"h{batch}_{seed}.json"
        code, summary, err = run_main("--ckpt", run, f"--likelihood={data}", f"--out={out}", *flags,
                                      f"--batch_size={batch}", f"--seed={seed}")
        assert code == 0, err
        results.append(torch.tensor(report(out)["per_sample"], dtype=torch.float64))
    assert "Hutchinson divergence (2 gaussian probes)" in summary and report(out)["n"] == 3
    want = direct(run, pixels[:3], LABELS[:3], SEED, sampler="heun2", steps=3, probes=2, probe="gaussian")
    torch.testing.assert_close(results[0], want, rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=0)
    assert (results[2] - results[0]).abs().max() > 1e-4


def test_unconditional_model_ignores_labels(tmp_path):
    """An unconditional U-ViT (3 channels, time_scale 999) reads the file's arr_1 not at all."""
    save_run(tmp_path / "run", "configs/cifar10_uvit_s2_fm.py", *TINY_MODEL["uvit"], "--config.model.img_size=8",
             "--config.data.image_size=8")
    pixels = write_npz(tmp_path / "with.npz", shape=(8, 8, 3), labels=[7, 7, 7, 7])
    write_npz(tmp_path / "without.npz", shape=(8, 8, 3), labels=None)
    values = []
    for name in ("with", "without"):
        code, _, err = run_main("--ckpt", tmp_path / "run", f"--likelihood={tmp_path / name}.npz", *FAST,
                                f"--out={tmp_path / name}.json")
        assert code == 0, err
        values.append(report(tmp_path / f"{name}.json")["per_sample"])
    assert values[0] == values[1]
    want = direct(tmp_path / "run", pixels, None, 0, sampler="heun2", steps=3)
    torch.testing.assert_close(torch.tensor(values[0], dtype=torch.float64), want, rtol=1e-5, atol=0)


def test_latent_model_reports_latent_bits_per_dim(tmp_path):
    """A latent SiT: images -> a posterior sample of the config's autoencoder (drawn from (seed, index)), bits/dim of
    the latents without the 8-bit grid, said so in the report."""
    ae = make_tiny_autoencoder(tmp_path / "vae")
    save_run(tmp_path / "run", "configs/imagenet256_sit_xl2.py", "--config.model.hidden_size=32",
             "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.input_size=4",
             "--config.data.image_size=32", f"--config.autoencoder.pretrained={ae}")
    pixels = write_npz(tmp_path / "data.npz", shape=(32, 32, 3))
    out = tmp_path / "latent.json"
    code, summary, err = run_main("--ckpt", tmp_path / "run", f"--likelihood={tmp_path / 'data.npz'}", *FAST,
                                  f"--out={out}", "--batch_size=3")
    assert code == 0, err
    result = report(out)
    assert "latents" in result["settings"]["space"] and "not comparable" in summary
    ready = load_for_sampling(tmp_path / "run")
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    noise = torch.stack([torch.randn(ready.image_shape, generator=torch.Generator().manual_seed(
        index_seed(0, i, DATA_STREAM))) for i in range(N)])
    latents = ready.autoencoder.encode(images, noise=noise)
    _, want = ready.objective.likelihood(ready.model, latents, {"y": torch.tensor(LABELS)}, sampler="heun2", steps=3,
                                         randn=PerSampleNoise(0, range(N)))
    torch.testing.assert_close(torch.tensor(result["per_sample"]), want, rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """Checkpoints the likelihood refuses: the VP-trained digits DiT and a text-to-image transport U-ViT."""
    root = tmp_path_factory.mktemp("others")
    save_run(root / "ddpm", "configs/digits_dit.py", *TINY_DIT)
    save_run(root / "t2i", "configs/mscoco_uvit_s2.py", *TINY_MODEL["uvit"], "--config.model.img_size=8",
             "--config.model.clip_dim=32", "--config.diffusion.kind=transport", "--config.sample.sampler=heun2")
    return root


def test_refusals(tmp_path, sit, others, monkeypatch):
    run, _, data = sit
    write_npz(tmp_path / "nolabels.npz", labels=None)
    base = ["--ckpt", run, f"--likelihood={data}", *FAST]
    cases = [
        (["--ckpt", others / "ddpm", f"--likelihood={data}"], "(diffusion.kind=transport); this one is "
                                                                "diffusion.kind=iddpm"),
        (["--ckpt", others / "t2i", f"--likelihood={data}"], "likelihood of text-to-image models is not supported"),
        ([*base, "--guidance=2"], "unguided"),
        (["--ckpt", run, f"--likelihood={tmp_path / 'nolabels.npz'}"], "needs the images' labels as arr_1"),
        ([*base, "--out=grid.png"], "--out must end in .json"),
        ([*base, "--out=samples.npz"], "--out must end in .json"),
        ([*base, "--sampler=sde_euler"], "--sampler must be one of euler, heun2, dopri5"),
        ([*base, "--labels=1,2"], "--labels does not apply to --likelihood"),
        ([*base, "--time_shift=2"], "--time_shift does not apply"),
        ([*base, "--probes=0"], "--probes must be >= 1"),
        ([*base, "--n_samples=9"], "holds 4 images"),
        (["--ckpt", run, f"--likelihood={tmp_path / 'missing.npz'}"], "data not found"),
        (["--ckpt", run, "--divergence=exact", f"--out={tmp_path / 'g.png'}"], "--divergence belong to --likelihood"),
    ]
    for argv, message in cases:
        code, _, err = run_main(*argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    write_npz(tmp_path / "big.npz", shape=(16, 16, 1))
    code, _, err = run_main("--ckpt", run, f"--likelihood={tmp_path / 'big.npz'}", *FAST)
    assert code == 2 and "takes 1x8x8 images" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(*base)
    assert code == 2 and "one process" in err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.chdir(tmp_path)  # --out defaults to likelihood.json; --guidance=1 is the likelihood's own
    code, _, err = run_main(*base, "--guidance=1", "--n_samples=1")
    assert code == 0 and report(tmp_path / "likelihood.json")["stderr"] is None, err
