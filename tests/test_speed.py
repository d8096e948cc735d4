"""Speed options leave results unchanged (fp32 equal to rounding, bf16 within mixed-precision tolerance), and the
benchmark runs end to end (not timed here)."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import dit.model as dit_model
import uvit.model as uvit_model
from diffusion.errors import ConfigError
from diffusion.registry import set_attention
from diffusion.training.loop import train
from diffusion.training.pieces import update_ema
from diffusion.training.speed import adamw, reuse_freed_memory
from dit.model import DiT
from tests.helpers import REPO, tiny_config
from uvit.model import UViT

sys.path.insert(0, str(REPO / "scripts"))
import benchmark as benchmark_script  # noqa: E402  (scripts/benchmark.py)

DIT_TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=4)
UVIT_TINY = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _spread(model):
    with torch.no_grad():  # zero-initialised layers (adaLN-Zero, decoders) would hide differences
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _qkv(dtype=torch.float32, length=17):
    torch.manual_seed(0)
    return [torch.randn(2, 3, length, 8, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("attend", [uvit_model.attend, dit_model.attend])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_explicit_attention_equals_sdpa_forward_and_gradients(attend, scale):
    grads = {}
    for path in ("sdpa", "math"):
        q, k, v = _qkv()
        out = attend(q, k, v, path, scale)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads[path] = (out.detach(), q.grad, k.grad, v.grad)
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_attention_takes_the_explicit_path_for_bf16_on_cpu_and_agrees():
    q, k, v = _qkv(torch.bfloat16)
    auto = uvit_model.attend(q, k, v, "auto")
    assert torch.equal(auto, uvit_model.attend(q, k, v, "math"))
    reference = uvit_model.attend(*(t.float() for t in (q, k, v)), "sdpa")
    torch.testing.assert_close(auto.float(), reference, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="unknown attention path"):
        dit_model.attend(q, k, v, "flash")


@pytest.mark.parametrize("build", [lambda: DiT(**DIT_TINY, block_type="cross_attn"), lambda: UViT(**UVIT_TINY)])
def test_attention_paths_give_the_same_network(build):
    torch.manual_seed(0)
    net = _spread(build())
    x, t, y = torch.randn(2, *((4, 8, 8) if isinstance(net, DiT) else (3, 8, 8))), torch.tensor([3, 600]), \
        torch.tensor([1, 2])
    results = {}
    for path in ("sdpa", "math"):
        set_attention(net, path)
        net.zero_grad()
        out = net(x, t, y)
        out.square().mean().backward()
        results[path] = (out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None])
    torch.testing.assert_close(results["sdpa"][0], results["math"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["sdpa"][1], results["math"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(m.attention_path == "math" for m in net.modules() if hasattr(m, "attention_path"))
    with pytest.raises(ConfigError, match="unknown attention path"):
        set_attention(net, "flash")


def _train_steps(impl: str, steps: int = 3, precision: str = "fp32"):
    torch.manual_seed(0)
    net = _spread(DiT(**DIT_TINY))
    ema = _spread(DiT(**DIT_TINY)).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    optimizer = adamw(net.parameters(), 1e-3, (0.9, 0.999), 1e-8, impl)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g), \
            torch.randint(0, 4, (4,), generator=g)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
            loss = net(x, t, y).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, net, 0.9)
        losses.append(loss.item())
    return net.state_dict(), ema.state_dict(), losses


def test_adamw_implementations_give_the_same_weights():
    """Equal to rounding. (The attention key bias gets gradients that are rounding noise, which Adam's
    normalisation turns into lr-sized steps: those entries differ by a few 1e-7 between implementations.)"""
    reference, ref_ema, _ = _train_steps("for_loop")
    for impl in ("foreach", "fused", "auto"):
        weights, ema, _ = _train_steps(impl)
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{impl} {key}")
            torch.testing.assert_close(ema[key], ref_ema[key], rtol=1e-5, atol=1e-6, msg=f"{impl} {key}")
    with pytest.raises(ConfigError, match="optim.impl"):
        adamw([torch.zeros(1, requires_grad=True)], 1e-3, (0.9, 0.999), 1e-8, "apex")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_stays_within_mixed_precision_tolerance(precision):
    _, _, fp32 = _train_steps("fused")
    weights, _, half = _train_steps("fused", precision=precision)
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights
    for a, b in zip(fp32, half):
        assert abs(a - b) < 2e-2 * abs(a), (fp32, half)
    assert fp32 != half  # autocast did run in half precision


def test_reuse_freed_memory_is_applied_on_glibc():
    import platform

    applied = reuse_freed_memory()
    assert applied == (platform.libc_ver()[0] == "glibc")
    x = torch.randn(64, 1 << 16)  # allocations after it still work and compute the same
    assert torch.equal(x + x, 2 * x)


def test_trainer_speed_options_leave_fp32_training_unchanged(tmp_path):
    """The trainer's defaults (attention auto, fused AdamW, heap reuse) against the plain path, 6 fp32 steps."""
    common = ["--config.train.steps=6", "--config.train.ckpt_every=6", "--config.train.log_every=3"]
    fast = train(tiny_config(*common), tmp_path / "fast")
    plain = train(tiny_config(*common, "--config.train.attention=sdpa", "--config.optim.impl=for_loop",
                              "--config.train.cpu_reuse_memory=false"), tmp_path / "plain")
    math = train(tiny_config(*common, "--config.train.attention=math"), tmp_path / "math")
    reference = load_file(plain / "model.safetensors")
    for run in (fast, math):
        weights = load_file(run / "model.safetensors")
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_compiled_backbone_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    net = _spread(DiT(**{**DIT_TINY, "depth": 1}))
    compiled = torch.compile(net)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 2])
    results = []
    for model in (net, compiled):
        net.zero_grad()
        loss = model(x, t, y).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_benchmark_runs_end_to_end_and_reports_what_it_measured(tmp_path, capsys):
    report = tmp_path / "bench.json"
    code = benchmark_script.main([
        "--preset", "DiT-S/2", "--config.model.input_size=8", "--config.model.depth=1", "--config.model.num_classes",
        "4", "--task", "train", "sample", "--batch", "2", "--precision", "fp32", "--options",
        "plain", "--variant", "fp32-fast:precision=fp32,options=fast,checkpointing=true",
        "--repeats", "1", "--warmup", "0", "--nfe", "3", "--sampler", "ddim", "--guidance", "1.5", "--threads", "1",
        "--json", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu"]
    peaks = data["matmul_peak_tflops"]
    assert set(peaks) == {"fp32"} and all(v > 0 for v in peaks.values())
    results = {(r["task"], r["variant"]): r for r in data["results"]}
    assert len(results) == 4
    for (task, _), r in results.items():
        assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_memory_mb"] > 0
        assert 0 < r["network_share"] <= 1 and r["forward_gflops_per_image"] > 0
        # train: one forward of the batch; sample: 3 guided evaluations of [cond; uncond]
        assert r["network_rows_per_repeat"] == (2 if task == "train" else 3 * 2 * 2)
    train_fp32 = [results[("train", v)] for v in ("fp32-plain", "fp32-fast")]
    assert train_fp32[0]["first_loss"] == pytest.approx(train_fp32[1]["first_loss"], rel=1e-5)
    assert results[("train", "fp32-fast")]["checkpointing"] is True  # and the same first loss (checked above)
    assert results[("train", "fp32-fast")]["speedup"] == pytest.approx(
        results[("train", "fp32-fast")]["images_per_s"] / results[("train", "fp32-plain")]["images_per_s"])
    assert "[benchmark]" in capsys.readouterr().out


def test_benchmark_refuses_bad_variants(capsys):
    assert benchmark_script.main(["--preset", "DiT-S/2", "--variant", "x:attention=flash"]) == 2
    assert "unknown attention" in capsys.readouterr().err
    assert benchmark_script.main(["--preset", "DiT-S/2", "--variant", "x:colour=red"]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err


def test_latent_benchmark_reads_cached_latents_and_encodes_images_with_a_real_sd_vae(tmp_path):
    """The end-to-end latent comparison on its real data paths: an SD-architecture AutoencoderKL (random weights)
    saved and loaded as a diffusers folder, JPEGs in an ImageFolder, latents extracted by diffusion.data.extraction."""
    from diffusion.tools.benchmark import Setup, Variant, run_comparison
    from diffusion.tools.latent_fixture import prepare_latent_fixture

    fixture = prepare_latent_fixture(str(tmp_path), resolution=64, images=2, progress=lambda text: None)
    assert (tmp_path / "latents" / "manifest.json").is_file() and (tmp_path / "sd-vae" / "config.json").is_file()
    setup = Setup(config_path=str(REPO / "configs" / "imagenet256_dit_xl2.py"), batch=2, threads=1,
                  overrides={"model.preset": "DiT-S/2", "model.depth": "1", "model.input_size": "8",
                             "model.num_classes": "2"})
    variants = [Variant(name=kind, optimizer="fused", data="loader", config=overrides)
                for kind, overrides in fixture.items()]
    results = run_comparison(setup, variants, repeats=1, warmup=0, progress=lambda text: None)
    assert [r["variant"] for r in results] == ["cached", "vae"]
    assert all(r["images_per_s"] > 0 and r["first_loss"] > 0 for r in results)
    # encoding 64x64 images with the full SD encoder costs far more than reading two cached moments
    assert results[1]["network_share"] < results[0]["network_share"]


def test_benchmark_flags_and_config_errors_exit_2(capsys):
    """The benchmark's command line is train.py's: --config.KEY=VALUE overrides (checked before any worker
    starts), the config's boolean words, one error line."""
    cases = [(["--preset", "DiT-S/2", "--config.model.nope=1"], "unknown config key 'model.nope'"),
             (["--preset", "DiT-S/2", "--set", "model.depth=1"], "unknown flag --set"),
             (["--preset", "DiT-S/2", "--variant", "x:checkpointing=maybe"], "expected a boolean"),
             (["--batch", "8"], "give --config=FILE or --preset NAME"),
             (["--preset", "DiT-S/2", "--config", str(REPO / "configs" / "digits_dit.py")], "one of them")]
    for argv, message in cases:
        assert benchmark_script.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    variant = benchmark_script.parse_variant("v:checkpointing=yes,compile=0,data.num_workers=0")
    assert variant.checkpointing is True and variant.compile is False and variant.config == {"data.num_workers": "0"}


def test_matmul_peak_keeps_to_its_time_budget():
    import time

    from diffusion.tools.flops import matmul_peak

    start = time.perf_counter()
    peak = matmul_peak(torch.float32, "cpu", budget_s=0.3)
    assert peak > 0 and time.perf_counter() - start < 2.0


def test_benchmark_says_when_bf16_is_emulated(monkeypatch, capsys):
    monkeypatch.setattr(benchmark_script, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(benchmark_script, "matmul_peak", lambda dtype, device: 1.0)

    def fail(*args, **kwargs):
        raise RuntimeError("variant 'bf16-fast' failed: stop here")

    monkeypatch.setattr(benchmark_script, "run_comparison", fail)
    argv = ["--preset", "DiT-S/2", "--precision", "bf16", "--options", "fast", "--device", "cpu"]
    assert benchmark_script.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("no native bf16") == 1 and "stop here" in err
    assert benchmark_script.main([*argv[:3], "fp32", *argv[4:]]) == 1  # fp32 only: nothing to say
    assert "no native bf16" not in capsys.readouterr().err
