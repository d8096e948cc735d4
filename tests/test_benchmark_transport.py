"""The benchmark on the flow-matching (transport) objective: SiT presets build SiT's recipe, and sampling reports
the network evaluations the sampler actually made, which for the transport samplers differ from their ``steps``."""

import json
import sys

import pytest

from diffusion.config.loading import load_config
from diffusion.errors import ConfigError
from diffusion.registry import resolve_model_kwargs
from diffusion.tools.benchmark import Setup, Variant, build_config
from tests.helpers import REPO

sys.path.insert(0, str(REPO / "scripts"))
import benchmark as benchmark_script  # noqa: E402  (scripts/benchmark.py)

SIT_SAMPLE_KEYS = ("sampler", "steps", "guidance_scale", "guidance_channels", "diffusion_form", "diffusion_norm",
                   "last_step", "last_step_size")


def _preset(name: str):
    return build_config(Setup(preset=name), Variant(name="check"))


def test_sit_preset_builds_sits_recipe_as_its_config_file_writes_it():
    config = _preset("SiT-S/2")
    assert (config.model.name, config.model.preset) == ("dit", "SiT-S/2")
    assert (config.model.class_dropout_prob, config.model.learn_sigma) == (0.1, True)
    d = config.diffusion
    assert (d.kind, d.path, d.prediction, d.loss_weight, d.time_scale) == ("transport", "linear", "velocity", "none",
                                                                          1.0)
    assert (config.optim.lr, config.optim.weight_decay) == (1e-4, 0.0)
    s = config.sample
    assert (s.sampler, s.steps, s.guidance_scale, s.guidance_channels, s.diffusion_form, s.last_step,
            s.last_step_size) == ("sde_euler", 250, 1.5, "3", "sigma", "mean", 0.04)
    # the same recipe as SiT-XL/2's config file, section by section
    sit = load_config(str(REPO / "configs" / "imagenet256_sit_xl2.py"))
    assert config.diffusion.to_dict() == sit.diffusion.to_dict()
    assert {k: config.sample[k] for k in SIT_SAMPLE_KEYS} == {k: sit.sample[k] for k in SIT_SAMPLE_KEYS}
    for key in ("lr", "betas", "weight_decay", "warmup_steps"):
        assert config.optim[key] == sit.optim[key], key
    for section in ("diffusion", "optim", "train", "sample", "data", "autoencoder"):  # loaded, not copied
        assert config[section].to_dict() == sit[section].to_dict(), section
    dit = load_config(str(REPO / "configs" / "imagenet256_dit_xl2.py"))
    assert all(_preset("DiT-B/4")[k].to_dict() == dit[k].to_dict() for k in ("diffusion", "optim", "train", "sample"))
    # SiT-S/2 is DiT-S/2's network, with DiT-S/2's data shape (32x32x4 latents)
    assert resolve_model_kwargs(config.model)[1] == resolve_model_kwargs(_preset("DiT-S/2").model)[1]


def test_dit_and_uvit_presets_keep_their_recipes_and_unknown_families_are_refused(capsys):
    dit = _preset("DiT-B/4")
    assert (dit.model.name, dit.diffusion.kind, dit.sample.sampler, dit.sample.steps) == ("dit", "iddpm", "ddpm", 250)
    uvit = _preset("U-ViT-S/2")
    assert (uvit.model.name, uvit.diffusion.kind) == ("uvit", "vp_sde")
    for bad in ("XiT-S/2", "SiT-Q/2"):
        with pytest.raises(ConfigError, match="unknown"):
            _preset(bad)
    assert benchmark_script.main(["--preset", "XiT-S/2"]) == 2
    assert "unknown preset family 'XiT'" in capsys.readouterr().err


def _sample_benchmark(tmp_path, monkeypatch, *flags: str) -> dict:
    """The benchmark's command line in process (no matmul peak: not what is tested), the tiny digits SiT, batch 1."""
    monkeypatch.setattr(benchmark_script, "matmul_peak", lambda dtype, device: 1e12)
    report = tmp_path / "bench.json"
    code = benchmark_script.main(["--config", str(REPO / "configs" / "digits_sit.py"), "--task", "sample",
                                  "--batch", "1", "--precision", "fp32", "--repeats", "1", "--warmup", "0",
                                  "--threads", "1", "--nfe", "5", "--json", str(report), *flags])
    assert code == 0
    return {r["variant"]: r for r in json.loads(report.read_text())["results"]}


# sampler -> the forward calls diffusion.samplers.transport makes with steps=5 grid points (4 intervals): euler 1
# and heun2 2 per step; the SDE drift F = drift + w * score is 2 calls (velocity, then the score from a second
# velocity call); sde_euler evaluates F once per step, sde_heun twice; the last step "mean" (SiT's default) F once more.
EXPECTED_NFE = {"heun2": 4 * 2, "euler": 4, "sde_euler": 4 * 2 + 2, "sde_heun": 4 * 4 + 2}


@pytest.mark.parametrize(("sampler", "guidance"), [("heun2", "1"), ("sde_heun", "0")])
def test_transport_benchmark_reports_the_evaluations_each_sampler_makes(sampler, guidance, tmp_path, monkeypatch,
                                                                        capsys):
    """``--nfe 5`` is the sampler's steps setting; the report gives the forward calls made per sampled batch.
    Guided (digits_sit's guidance 2; ``--guidance 0``: the config's), each call is one forward of [cond; uncond],
    two rows per sample; ``--guidance 1`` one."""
    results = _sample_benchmark(tmp_path, monkeypatch, "--sampler", sampler, "--guidance", guidance,
                                "--options", "fast")
    r, nfe = results["fp32-fast"], EXPECTED_NFE[sampler]
    assert (r["sampler"], r["sampler_steps"], r["nfe"], r["network_calls_per_repeat"]) == (sampler, 5, nfe, nfe), r
    assert r["network_rows_per_repeat"] == nfe * (1 if guidance == "1" else 2)
    assert r["images_per_s"] > 0 and 0 < r["network_share"] <= 1
    out = capsys.readouterr().out.strip().splitlines()
    assert f"{sampler} steps 5: NFE {nfe}" in out[0]  # the table's line
    assert out[-1].startswith("[benchmark]") and f"{sampler} steps 5 NFE {nfe}" in out[-1]  # the summary line


def test_repa_training_step_with_encoder_features_on_the_fly_against_cached(tmp_path, monkeypatch):
    """A REPA training step two ways: the encoder on the batch's images at every step, and its features read as a
    cache serves them. Both train the projectors (same first loss: the same targets); the cached one runs no
    encoder."""
    from tests.helpers import make_tiny_dinov2

    monkeypatch.setattr(benchmark_script, "matmul_peak", lambda dtype, device: 1e12)
    weights = make_tiny_dinov2(tmp_path / "dinov2.pth")
    report = tmp_path / "bench.json"
    code = benchmark_script.main([
        "--config", str(REPO / "configs" / "digits_sit.py"), "--task", "train", "--batch", "2", "--repeats", "1",
        "--warmup", "0", "--threads", "1", "--config.repa.encoders=dinov2-vit-s",
        f"--config.repa.encoder_weights={weights}", "--config.repa.layer=1", "--config.repa.projector_dim=16",
        "--variant", "on_the_fly:repa_targets=images", "--variant", "cached:repa_targets=cached",
        "--json", str(report)])
    assert code == 0
    results = {r["variant"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {"on_the_fly", "cached"}
    assert results["on_the_fly"]["first_loss"] == pytest.approx(results["cached"]["first_loss"], rel=1e-5)
    plain = _plain_loss(tmp_path, monkeypatch)
    assert abs(results["cached"]["first_loss"] - plain) > 1e-3  # the alignment term is in the loss


def _plain_loss(tmp_path, monkeypatch) -> float:
    """The same step's loss without REPA."""
    report = tmp_path / "plain.json"
    assert benchmark_script.main([
        "--config", str(REPO / "configs" / "digits_sit.py"), "--task", "train", "--batch", "2", "--repeats", "1",
        "--warmup", "0", "--threads", "1", "--variant", "plain:precision=fp32", "--json", str(report)]) == 0
    return json.loads(report.read_text())["results"][0]["first_loss"]
