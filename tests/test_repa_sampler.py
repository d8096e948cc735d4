"""REPA's samplers and its released checkpoint: parity with REPA's own ``samplers.py`` (tests/fixtures/repa_sampler.pt,
see its README) through the time-direction adapter (``diffusion.objectives.repa_time``), both with REPA's samplers
(``repa_euler``, ``repa_heun``, ``repa_sde``) and with SiT's where they coincide; the released file ``last.pt`` in
REPA's format by name; the config's sampler defaults are REPA's FID-1.42 settings."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from diffusion.config.cli import parse_command_line
from diffusion.config.loading import load_config
from diffusion.objectives.repa_time import ReversedTime, repa_guidance_bounds
from diffusion.objectives.transport import build_transport
from diffusion.registry import build_model, build_objective
from diffusion.released import RELEASED, released_config, sampling_state_dict
from diffusion.samplers.repa import repa_ode_times, repa_sde_times
from diffusion.sampling.settings import sampler_settings
from diffusion.weights import load_state_strict, read_weights_file
from dit import DiT
from tests.helpers import load_fixture, make_tiny_autoencoder, rel_err

NAME = "last.pt"  # REPA's download name (utils.download_model), the released SiT-XL/2 + REPA
CONFIG = "configs/imagenet256_sit_xl2_repa.py"
PATHS = {"linear": "linear", "cosine": "gvp"}  # REPA's path_type -> SiT's path of the same interpolant
# The fixture's REPA SiT as config overrides of the released config (its 1000 classes: REPA's null label is 1000).
TINY = ["--config.model.hidden_size=64", "--config.model.depth=4", "--config.model.num_heads=4",
        "--config.model.input_size=8", "--config.data.image_size=64"]


@functools.cache
def fixture() -> tuple[DiT, dict]:
    """Our DiT (learn_sigma=False, REPA's out_channels = in_channels) with the fixture's REPA weights, the
    projectors dropped as for the released file."""
    fx = load_fixture("repa_sampler")
    cfg = fx["config"]
    model = DiT(**{k: cfg[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
                                       "mlp_ratio", "class_dropout_prob", "num_classes")}, learn_sigma=False).eval()
    model.load_state_dict(sampling_state_dict(NAME, fx["state_dict"]), strict=True)
    return model, fx


class Recorded:
    """model(x, t, y) logging each call's time, batch size and input."""

    def __init__(self, model):
        self.model, self.t, self.batch, self.inputs = model, [], [], []

    def __call__(self, x, t, y):
        self.t.append(t.reshape(-1)[0].item())
        self.batch.append(x.shape[0])
        self.inputs.append(x[:2].clone())
        return self.model(x, t, y)


def replay(draws: torch.Tensor):
    it = iter(draws)
    return lambda x: next(it).to(x)


def run_ids() -> list[str]:
    runs = load_fixture("repa_sampler")["inputs"]["runs"]
    return [f"{r['sampler']}{'-heun' if r['heun'] else ''}-cfg{r['cfg_scale']}-{r['path_type']}" for r in runs]


def sample_run(i: int, sampler: str, steps: int, **kw):
    """Run i of the fixture with one of our samplers: (output, recorded calls)."""
    model, fx = fixture()
    run, out = fx["inputs"]["runs"][i], fx["output"]["runs"][i]
    y = fx["inputs"]["y"]
    net = Recorded(model)
    lo, hi = 1 - run["guidance_high"], 1 - run["guidance_low"]  # REPA's interval in SiT's time
    objective = build_transport(path=PATHS[run["path_type"]], time_direction="repa")
    result = objective.sample(net, fx["inputs"]["latents"], {"y": y}, null_cond={"y": torch.full_like(y, 1000)},
                              guidance_scale=run["cfg_scale"], sampler=sampler, steps=steps, guidance_t_lo=lo,
                              guidance_t_hi=hi, randn=replay(out["draws"]) if "draws" in out else None, **kw)
    return result, net


@pytest.mark.parametrize("i", range(7), ids=run_ids())
def test_repa_samplers_match_repa(i):
    """REPA's SDE and Euler/Heun ODE samplers with the guidance interval, REPA's draws replayed: the sample to 1e-5
    relative (fp32 network, float64 state as REPA), the number of calls, each call's batch (guided or not) and
    time."""
    _, fx = fixture()
    run, out = fx["inputs"]["runs"][i], fx["output"]["runs"][i]
    sampler = "repa_sde" if run["sampler"] == "euler_maruyama_sampler" else "repa_heun" if run["heun"] else "repa_euler"
    sde = {"diffusion_form": "linear"} if sampler == "repa_sde" else {}  # the ODE samplers take no diffusion
    result, net = sample_run(i, sampler, run["num_steps"], **sde)
    assert result.dtype == torch.float32
    assert rel_err(result.double(), out["output"]) < 1e-5
    assert len(net.t) == out["nfe"] and net.batch == out["model_call_batch"].tolist()
    assert max(abs(a - b) for a, b in zip(net.t, out["model_call_t"].tolist())) < 1e-6
    if "model_inputs_first_half" in out:  # every state the network saw, not only the end point
        torch.testing.assert_close(torch.stack(net.inputs), out["model_inputs_first_half"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("i", [0, 1, 6, 2, 4], ids=lambda i: run_ids()[i])
def test_sits_samplers_through_the_adapter_match_repa(i):
    """The adapter alone makes REPA's network a SiT-time network: SiT's Euler with N + 1 grid points is REPA's
    Euler with N steps, SiT's SDE (w = 1 - t, mean last step over 0.04) with N points is REPA's Euler-Maruyama (two
    evaluations per step instead of one)."""
    _, fx = fixture()
    run, out = fx["inputs"]["runs"][i], fx["output"]["runs"][i]
    if run["sampler"] == "euler_maruyama_sampler":
        result, net = sample_run(i, "sde_euler", run["num_steps"], diffusion_form="linear", last_step="mean",
                                 last_step_size=0.04)
        assert len(net.t) == 2 * out["nfe"] and net.batch[::2] == out["model_call_batch"].tolist()
    else:
        result, net = sample_run(i, "euler", run["num_steps"] + 1)
        assert net.batch == out["model_call_batch"].tolist()
    assert rel_err(result.double(), out["output"]) < 1e-5


def test_reversed_time_is_the_repa_loss():
    """time_direction="repa" trains REPA's network with SiT's velocity loss: at SiT time 1 - tau, data x1 and noise
    x0, it is REPA's denoising loss (repa_loss.pt: same weights, REPA's draws), on both of REPA's paths."""
    model, _ = fixture()
    fx = load_fixture("repa_loss")
    for case, out in list(zip(fx["inputs"]["cases"], fx["output"]["cases"]))[:3]:  # eval mode: no label dropout
        objective = build_transport(path=PATHS[case["path_type"]], time_direction="repa")
        losses = objective.training_losses(model, case["images"], {"y": out["labels_seen_by_model"]},
                                           t=1 - out["time_input"], noise=out["noises"])
        torch.testing.assert_close(losses["loss"], out["denoising_loss"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(-losses["pred"], out["model_output"], rtol=1e-4, atol=1e-6)
    wrapped = ReversedTime(lambda x, t: torch.cat([x * t.view(-1, 1, 1, 1), x], 1), channels=1)
    x, t = torch.ones(2, 1, 1, 1), torch.tensor([0.25, 1.0])
    assert wrapped(x, t).flatten().tolist() == [-0.75, 1.0, -0.0, 1.0]  # velocity negated at 1 - t, the rest kept


def test_guidance_interval_is_decided_on_repas_grid():
    """Guidance on exactly the steps REPA guides, bounds included (tau = 0.7 is a grid point at 50 ODE steps), for
    the ODE and the SDE at REPA's step counts; guidance_t_lo / hi are SiT times and convert decimal for decimal."""
    assert repa_guidance_bounds(0.3, 1.0) == (0.0, 0.7) and repa_guidance_bounds(0.0, 0.9) == (0.1, 1.0)
    objective = build_transport(time_direction="repa")
    noise, y = torch.zeros(1, 1, 2, 2), torch.tensor([1])
    for sampler, steps, taus in (("repa_euler", 50, repa_ode_times(50)[:-1]),
                                 ("repa_sde", 250, repa_sde_times(250)[:-1]),
                                 ("repa_heun", 10, repa_ode_times(10)[:-1])):
        batches = []

        def model(x, t, y, batches=batches):
            batches.append(len(x))
            return torch.zeros_like(x)

        sde = {"diffusion_form": "linear"} if sampler == "repa_sde" else {}
        objective.sample(model, noise, {"y": y}, null_cond={"y": y + 1}, guidance_scale=1.8, sampler=sampler,
                         steps=steps, guidance_t_lo=0.3, randn=torch.zeros_like, **sde)
        expected = [2 if tau <= 0.7 else 1 for tau in taus.tolist()]  # REPA's test on its float64 grid
        if sampler == "repa_heun":
            expected = [b for b in expected for _ in (0, 1)][:-1]  # two calls a step, both decided at the start
        assert batches == expected, sampler
    assert repa_ode_times(50)[15].item() == 0.7 and batches.count(2) > 0


def test_repa_samplers_refuse_what_they_cannot_run():
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    noise, cond = torch.zeros(1, 1, 2, 2), {"y": torch.tensor([0])}
    for objective, kw, message in ((build_transport(prediction="noise"), {}, "velocity"),
                                   (build_transport(), {"time_shift": 2.0}, "time_shift"),
                                   (build_transport(), {"reverse": True}, "reverse"),
                                   (build_transport(), {"diffusion_form": "SBDM"}, "infinite")):
        with pytest.raises(ValueError, match=message):
            objective.sample(model, noise, cond, sampler="repa_sde", steps=3, **kw)
    with pytest.raises(ValueError, match="unknown time_direction"):
        build_transport(time_direction="backwards")


# ----------------------------------------------------------------------------------------------------------------
# The released checkpoint and its config
# ----------------------------------------------------------------------------------------------------------------


def tiny_config():
    cfg, _ = parse_command_line([f"--config={released_config(NAME)}", *TINY])
    return cfg


def test_released_name_picks_the_config_and_its_weights_load(tmp_path):
    """last.pt in REPA's formats (the released plain state_dict with its projectors; train.py's {"model", "ema",
    "opt", "args", "steps"}): EMA weights, projectors ignored, the rest strictly into the config's DiT; the config's
    own sampler (repa_sde, guidance 1.8 on REPA's tau <= 0.7) reproduces REPA's run at its 10 steps."""
    assert released_config(NAME) == released_config("last.pt") and RELEASED[NAME].paper_fid == 1.42
    _, fx = fixture()
    state = fx["state_dict"]
    assert any(k.startswith("projectors.") for k in state)
    raw = {k: v + 0.05 for k, v in state.items()}
    (tmp_path / "plain").mkdir()
    (tmp_path / "train").mkdir()
    torch.save(state, tmp_path / "plain" / NAME)
    torch.save({"model": raw, "ema": state, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="SiT-XL/2", enc_type="dinov2-vit-b"), "steps": 4_000_000},
               tmp_path / "train" / NAME)
    cfg = tiny_config()
    run, out = fx["inputs"]["runs"][0], fx["output"]["runs"][0]
    y = fx["inputs"]["y"]
    for kind in ("plain", "train"):
        model = build_model(cfg.model)
        weights = sampling_state_dict(NAME, read_weights_file(tmp_path / kind / NAME))
        load_state_strict(model, weights, tmp_path / kind / NAME)
        objective = build_objective(cfg.diffusion)
        settings = {**sampler_settings(objective, cfg.sample).kwargs, "steps": run["num_steps"]}
        result = objective.sample(model.eval(), fx["inputs"]["latents"], {"y": y},
                                  null_cond={"y": torch.full_like(y, model.null_label)}, randn=replay(out["draws"]),
                                  **settings)
        assert rel_err(result.double(), out["output"]) < 1e-5, kind
    with pytest.raises(Exception, match="projectors"):  # without dropping them the file does not fit
        load_state_strict(build_model(cfg.model), state, NAME)


def test_sample_py_draws_from_the_released_file_by_name(tmp_path):
    """sample.py --ckpt=last.pt, no --config: REPA's file (projectors and all) draws a labelled grid."""
    state = load_fixture("repa_sampler")["state_dict"]
    torch.save(state, tmp_path / NAME)
    ae = make_tiny_autoencoder(tmp_path / "vae")
    out = tmp_path / "grid.png"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = sample.main([f"--ckpt={tmp_path / NAME}", *TINY, f"--config.autoencoder.pretrained={ae}",
                            "--labels=9,0", "--per_class=2", "--steps=3", f"--out={out}"])
    assert code == 0, stderr.getvalue()
    assert NAME in stdout.getvalue() and "EMA" in stdout.getvalue()
    assert np.asarray(Image.open(out)).std() > 10


def test_config_is_repas_recipe_and_sampler():
    cfg = load_config(released_config(NAME))
    s = cfg.sample
    # generate.py --mode sde --num-steps 250 --cfg-scale 1.8 --guidance-high 0.7 (--guidance-low 0), all channels
    assert (s.sampler, s.steps, s.guidance_scale, s.guidance_channels) == ("repa_sde", 250, 1.8, "all")
    assert repa_guidance_bounds(s.guidance_t_lo, s.guidance_t_hi) == (0.0, 0.7)
    assert (s.diffusion_form, s.diffusion_norm, s.last_step, s.last_step_size) == ("linear", 1.0, "mean", 0.04)
    assert (s.precision, s.tf32, s.n_samples, s.labels) == ("fp32", True, 50_000, "uniform")
    assert (cfg.preview.sampler, cfg.preview.steps) == ("repa_euler", 50)
    objective = build_objective(cfg.diffusion)
    assert objective.time_direction == "repa" and objective.prediction == "velocity"
    assert type(objective.path).__name__ == "LinearPath" and objective.time_sampling == "uniform"
    assert sampler_settings(objective, s)["sampler"] in objective.SAMPLERS
    # train.py / README: DINOv2-B at depth 8, projector 2048, coefficient 0.5, AdamW 1e-4, batch 256, fp16, clip 1
    r = cfg.repa
    assert (r.encoders, r.layer, r.projector_dim, r.coeff, r.legacy) == ("dinov2-vit-b", 8, 2048, 0.5, False)
    assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.eps) == (1e-4, (0.9, 0.999), 0.0,
                                                                                            1e-8)
    t = cfg.train
    assert (t.batch_size, t.mixed_precision, t.grad_clip, t.steps, t.ema_decay) == (256, "fp16", 1.0, 4_000_000,
                                                                                  0.9999)
    with torch.device("meta"):
        model = build_model(cfg.model)
    # REPA's SiT-XL/2 without its projectors: DiT-XL/2 (675,129,632) less the learned-sigma rows of the final layer
    assert sum(p.numel() for p in model.parameters()) == 675_129_632 - (1152 + 1) * 16
    assert len(model.state_dict()) == 292
