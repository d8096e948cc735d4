"""sample.py and diffusion.sampling: every checkpoint format, per-sample seeds, resumable many-process .npz jobs."""

import argparse
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from diffusion.checkpoint import save_checkpoint
from diffusion.config.cli import parse_command_line
from diffusion.config.loading import load_config
from diffusion.errors import ConfigError
from diffusion.registry import build_model, build_objective, resolve_model_kwargs
from diffusion.released import RELEASED, markdown_table, released_config
from diffusion.sampling.generate import generate
from diffusion.sampling.grids import default_grid_classes, sample_grid
from diffusion.sampling.jobs import SampleJob
from diffusion.sampling.loader import input_shape, load_for_sampling
from diffusion.sampling.per_sample import LabelPlan, PerSampleNoise, training_class_counts
from diffusion.sampling.settings import preview_settings, sampler_settings
from tests.helpers import REPO, TINY_MODEL, load_fixture, make_tiny_autoencoder, make_tiny_clip, run_sample

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DIT = [f"--config={REPO / 'configs/digits_dit.py'}", *TINY_MODEL["dit"]]
# ancestral DDPM (stochastic: a fresh Gaussian draw per step) with guidance on the null label
DDPM = ["--sampler=ddpm", "--steps=6", "--guidance=2.0"]


run_main = run_sample  # sample.py in this process


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere: DiT's init zeroes its output layers, which would make every sample equal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory) -> Path:
    """A tiny class-conditional DiT (8x8 grey digits, learned sigma, null label) as a plain .pt state_dict."""
    cfg, _ = parse_command_line(DIT)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dit") / "tiny_dit.pt"
    torch.save(perturbed(build_model(cfg.model), seed=1).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    return make_tiny_autoencoder(tmp_path_factory.mktemp("ae") / "vae")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", hidden_size=32)


def npz(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------
# Per-sample randomness
# ----------------------------------------------------------------------------------------------------------


def test_per_sample_noise_depends_only_on_seed_and_index():
    x = torch.empty(4, 2, 3, 3)
    full = PerSampleNoise(7, range(4))
    first, second = full(x), full(x)  # a second call continues every sample's own stream
    assert not torch.equal(first, second)
    part = PerSampleNoise(7, [2, 3])
    assert torch.equal(part(x[:2]), first[2:]) and torch.equal(part(x[:2]), second[2:])
    assert not torch.equal(PerSampleNoise(8, range(4))(x), first)
    with pytest.raises(ValueError, match="batch of 3"):
        full(x[:3])


def test_generate_is_independent_of_the_batch(dit_file):
    cfg, _ = parse_command_line(DIT)
    model = build_model(cfg.model)
    model.load_state_dict(torch.load(dit_file, weights_only=True))
    objective = build_objective(cfg.diffusion)
    cfg.sample.update(sampler="ddpm", steps=5, guidance_scale=2.0)
    labels = torch.tensor([3, 1, 4, 1, 5])
    whole = generate(model, objective, cfg.sample, (1, 8, 8), labels=labels, seed=3)
    pieces = [generate(model, objective, cfg.sample, (1, 8, 8), labels=labels[s], indices=range(5)[s], seed=3)
              for s in (slice(0, 2), slice(2, 5))]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=1e-5)
    assert whole.std() > 0.1 and not torch.allclose(whole[1], whole[3])  # same label, own noise
    other = generate(model, objective, cfg.sample, (1, 8, 8), labels=labels, seed=4)
    assert (other - whole).abs().max() > 0.1


def test_sample_and_preview_settings():
    """Each sampler gets its own options only; a preview with another sampler takes that sampler's defaults, not the
    sample section's (U-ViT CIFAR-10: Euler-Maruyama to 1e-3, its DPM-Solver previews to DPM-Solver's 1e-4)."""
    cfg = load_config(REPO / "configs/cifar10_uvit_s2.py")
    objective = build_objective(cfg.diffusion)
    settings = sampler_settings(objective, cfg.sample).kwargs
    assert settings == {"sampler": "euler_maruyama", "steps": 1000, "guidance_scale": 1.0, "guidance_channels": "all",
                        "t_end": 1e-3, "clip_denoised": None}
    preview = preview_settings(cfg)
    assert (preview.sampler, preview.steps, preview.t_end) == ("dpm_solver", 50, None)
    assert cfg.sample.sampler == "euler_maruyama" and cfg.sample.t_end == 1e-3
    assert set(sampler_settings(objective, preview).kwargs) == {"sampler", "steps", "guidance_scale",
                                                                "guidance_channels", "order", "t_end", "skip_type",
                                                                "clip_denoised"}
    from diffusion.samplers import default_t_end

    assert default_t_end(preview.sampler, objective.schedule) == 1e-4
    cfg.preview.update(sampler="", steps=0)
    assert sampler_settings(objective, preview_settings(cfg)).kwargs == settings


def test_the_one_overlay():
    """Laying a section over ``sample``: empty values are not set; another sampler resets every sampler option the
    section does not set (the previews, checkpoint selection, sample.py's flags and the benchmark all use it)."""
    from diffusion.evaluation.training import selection_sample_config
    from diffusion.sampling.settings import OPTION_KEYS, option_default, overlay

    cfg = load_config(REPO / "configs/cifar10_uvit_s2.py")
    cfg.sample.eta = 0.5
    same = overlay(cfg.sample, {"sampler": "euler_maruyama", "steps": 0, "t_end": None})
    assert (same.sampler, same.steps, same.t_end, same.eta) == ("euler_maruyama", 1000, 1e-3, 0.5)
    other = overlay(cfg.sample, {"sampler": "ddim", "skip_type": "logSNR"})
    assert all(other[k] == option_default(k) for k in OPTION_KEYS if k != "skip_type")
    assert (other.skip_type, other.steps, cfg.sample.eta) == ("logSNR", 1000, 0.5)
    cfg.eval.update(sampler="dpm_solver", steps=50)
    selection = selection_sample_config(cfg)
    assert (selection.sampler, selection.steps, selection.t_end, selection.eta) == ("dpm_solver", 50, None, 0.0)
    flags = overlay(cfg.sample, {"sampler": "euler_ode", "guidance_scale": 1.0}, skip_empty=False)
    assert (flags.sampler, flags.t_end, flags.guidance_scale) == ("euler_ode", None, 1.0)


def test_sampler_settings_refuse_another_samplers_options():
    cfg = load_config(REPO / "configs/cifar10_uvit_s2.py")
    objective = build_objective(cfg.diffusion)
    cfg.sample.eta = 0.3  # DDIM's, not Euler-Maruyama's
    with pytest.raises(ConfigError, match="sample.eta=0.3 does not apply to sampler 'euler_maruyama'.*t_end"):
        sampler_settings(objective, cfg.sample)
    cfg.sample.update(eta=0.0, atol=1e-4)  # the transport samplers'
    with pytest.raises(ConfigError, match="sample.atol=0.0001 does not apply"):
        sampler_settings(objective, cfg.sample)
    with pytest.raises(ValueError, match="eta does not apply to sampler 'dpm_solver'"):
        objective.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), {}, sampler="dpm_solver", steps=3, eta=0.1)


# ----------------------------------------------------------------------------------------------------------
# Evaluation labels
# ----------------------------------------------------------------------------------------------------------


def test_uniform_labels_are_per_index_and_uniform():
    plan = LabelPlan("uniform", 10, seed=0)
    labels = plan(range(20_000))
    assert torch.equal(plan([5, 17, 19_999]), labels[[5, 17, 19_999]])
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200
    assert not torch.equal(LabelPlan("uniform", 10, seed=1)(range(100)), labels[:100])


def test_balanced_labels_cover_every_class_equally():
    plan = LabelPlan("balanced", 10, seed=0)
    labels = plan(range(50))
    assert sorted(labels[:10].tolist()) == list(range(10)) and torch.bincount(labels).tolist() == [5] * 10
    assert torch.equal(plan(range(30, 40)), labels[30:40])
    assert not torch.equal(LabelPlan("balanced", 10, seed=1)(range(10)), labels[:10])


def test_train_freq_labels_follow_class_counts():
    plan = LabelPlan("train_freq", 4, seed=0, class_counts=[1, 3, 0, 6])
    labels = plan(range(20_000))
    freq = torch.bincount(labels, minlength=4).double() / 20_000
    assert freq[2] == 0 and (freq - torch.tensor([0.1, 0.3, 0.0, 0.6], dtype=torch.float64)).abs().max() < 0.02
    assert torch.equal(plan([7, 3]), labels[[7, 3]])
    with pytest.raises(ValueError, match="4 class counts"):
        LabelPlan("train_freq", 4, class_counts=[1, 2])


def test_grids_of_many_classes_show_sixteen_rows():
    assert default_grid_classes(10) == list(range(10))
    rows = default_grid_classes(1000)
    assert len(rows) == 16 and rows[:3] == [0, 62, 125] and rows[-1] == 937


def test_given_labels_cycle_and_are_checked():
    assert LabelPlan("given", 10, given=[3, 1, 4])(range(7)).tolist() == [3, 1, 4, 3, 1, 4, 3]
    with pytest.raises(ValueError, match="out of range"):
        LabelPlan("given", 10, given=[3, 12])


def test_class_counts_from_meta_or_image_folder(tmp_path):
    cfg = load_config(REPO / "configs/imagenet64_uvit_m4.py")
    assert training_class_counts(cfg, {"class_counts": [5, 6]}) == [5, 6]
    cfg.data.root = str(tmp_path)
    with pytest.raises(ValueError, match="train_freq needs"):
        training_class_counts(cfg, {})
    for name, n in (("n02", 1), ("n01", 3)):  # classes are numbered by sorted folder name
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (2, 2)).save(tmp_path / "train" / name / f"{i}.JPEG")
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    assert training_class_counts(cfg, {}) == [3, 1]


# ----------------------------------------------------------------------------------------------------------
# .npz jobs: the same file for any process count and batch size, resume, refusal of changed settings
# ----------------------------------------------------------------------------------------------------------


def test_npz_identical_for_one_and_two_processes_and_any_batch_size(tmp_path, dit_file):
    job = ["--ckpt", dit_file, *DIT, *DDPM, "--n_samples=10", "--chunk_size=4", "--seed=5"]
    code, out, err = run_main(*job, "--batch_size=3", f"--out={tmp_path / 'a.npz'}")
    assert code == 0, err
    assert "wrote" in out and "10 samples of 8x8x3" in out and "ddpm 6 steps" in out and "guidance 2" in out
    a = npz(tmp_path / "a.npz")
    assert set(a) == {"arr_0", "arr_1"} and a["arr_0"].shape == (10, 8, 8, 3) and a["arr_0"].dtype == np.uint8
    assert len(np.unique(a["arr_0"])) > 50  # real variety, not saturated
    assert a["arr_1"].dtype == np.int64 and a["arr_1"].min() >= 0 and a["arr_1"].max() < 10
    assert not (tmp_path / "a.parts").exists() and (tmp_path / "a.job.json").is_file()

    code, _, err = run_main(*job, "--batch_size=4", f"--out={tmp_path / 'b.npz'}")
    assert code == 0, err
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
              "sample.py", *map(str, job), "--batch_size=2", f"--out={tmp_path / 'c.npz'}"]
    proc = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("wrote") == 1  # rank 0 reports
    for other in ("b", "c"):
        b = npz(tmp_path / f"{other}.npz")
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"]), other

    code, _, err = run_main(*job, "--seed=6", f"--out={tmp_path / 'd.npz'}")
    assert code == 0, err
    assert not np.array_equal(npz(tmp_path / "d.npz")["arr_0"], a["arr_0"])


def test_killed_job_resumes_and_reuses_finished_chunks(tmp_path, dit_file):
    job = ["--ckpt", dit_file, *DIT, "--sampler=ddpm", "--steps=100", "--guidance=2.0", "--n_samples=12",
           "--chunk_size=2", "--batch_size=2", "--seed=1"]
    out = tmp_path / "killed.npz"
    proc = subprocess.Popen([sys.executable, "sample.py", *map(str, job), f"--out={out}"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.parts"
    deadline = time.time() + 120
    while len(list(parts.glob("chunk_*.npz"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(parts.glob("chunk_*.npz"))
    assert 2 <= len(finished) < 6 and not out.exists(), "the job should have been killed mid-way"
    marked = finished[0]  # a finished chunk must be taken as it is, not drawn again
    with np.load(marked) as data:
        np.savez(marked, images=np.full_like(data["images"], 7), labels=data["labels"])
    code, summary, err = run_main(*job, f"--out={out}")
    assert code == 0, err
    assert f"{len(finished)} of 6 chunks reused" in summary
    code, _, err = run_main(*job, f"--out={tmp_path / 'straight.npz'}")
    assert code == 0, err
    resumed, straight = npz(out), npz(tmp_path / "straight.npz")
    c = int(marked.stem.split("_")[1])
    assert (resumed["arr_0"][2 * c:2 * c + 2] == 7).all()
    resumed["arr_0"][2 * c:2 * c + 2] = straight["arr_0"][2 * c:2 * c + 2]
    assert np.array_equal(resumed["arr_0"], straight["arr_0"]) and np.array_equal(resumed["arr_1"], straight["arr_1"])


def test_changed_settings_are_refused_on_resume(tmp_path, dit_file):
    job = ["--ckpt", dit_file, *DIT, *DDPM, "--n_samples=4", "--chunk_size=2", f"--out={tmp_path / 's.npz'}"]
    assert run_main(*job)[0] == 0
    record = json.loads((tmp_path / "s.job.json").read_text())
    assert record["num_samples"] == 4 and record["chunk_size"] == 2
    assert record["settings"]["sampler"] == {"sampler": "ddpm", "steps": 6, "guidance_scale": 2.0,
                                             "guidance_channels": "all", "clip_denoised": True,
                                             "precision": "fp32", "tf32": False, "quantize": "round"}
    code, out, _ = run_main(*job, "--batch_size=1")  # batch size does not change samples
    assert code == 0 and "already complete (4 samples" in out
    no_count = [a for a in job if not str(a).startswith("--n_samples")]
    assert "already complete (4 samples" in run_main(*no_count)[1]  # the recorded count, not 50000
    code, _, err = run_main(*job, "--steps=7", "--seed=2")
    assert code == 2 and "changed: sampler.steps, seed" in err and "Traceback" not in err
    (tmp_path / "s.npz").unlink()  # a partly drawn job (record, no final file) is checked the same way
    code, _, err = run_main(*job, "--label_dist=balanced")
    assert code == 2 and "changed: labels.mode" in err
    (tmp_path / "other.npz").write_bytes(b"x")
    code, _, err = run_main(*job[:-1], f"--out={tmp_path / 'other.npz'}")
    assert code == 2 and "has no job record" in err


def test_records_from_before_per_sampler_options_resume(tmp_path, dit_file):
    """Older records held every sampler option (order, t_end, ... for ddpm too): at their defaults they were unused
    and the job resumes; one away from its default is a different job."""
    job = ["--ckpt", dit_file, *DIT, *DDPM, "--n_samples=4", "--chunk_size=2", f"--out={tmp_path / 's.npz'}"]
    assert run_main(*job)[0] == 0
    record = tmp_path / "s.job.json"
    saved = json.loads(record.read_text())
    saved["settings"]["sampler"].update(order=3, t_end=None, skip_type=None, eta=0.0)
    del saved["settings"]["sampler"]["quantize"]
    record.write_text(json.dumps(saved))
    code, out, err = run_main(*job)
    assert code == 0 and "already complete" in out, err
    saved["settings"]["sampler"]["t_end"] = 0.01
    record.write_text(json.dumps(saved))
    code, _, err = run_main(*job)
    assert code == 2 and "changed: sampler.t_end" in err


def test_label_choices_reach_the_npz(tmp_path, dit_file):
    job = ["--ckpt", dit_file, *DIT, *DDPM, "--steps=2", "--n_samples=20", "--chunk_size=8"]
    assert run_main(*job, "--label_dist=balanced", f"--out={tmp_path / 'b.npz'}")[0] == 0
    assert np.bincount(npz(tmp_path / "b.npz")["arr_1"]).tolist() == [2] * 10
    assert run_main(*job, "--labels=3,1,4", f"--out={tmp_path / 'g.npz'}", f"--png_dir={tmp_path / 'png'}")[0] == 0
    g = npz(tmp_path / "g.npz")
    assert g["arr_1"].tolist() == [3, 1, 4] * 6 + [3, 1]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 20 and pngs[0].name == "000000.png"
    assert np.array_equal(np.asarray(Image.open(pngs[13])), g["arr_0"][13])


# ----------------------------------------------------------------------------------------------------------
# Checkpoint formats
# ----------------------------------------------------------------------------------------------------------

UVIT_LATENT = ["--config.model.embed_dim=64", "--config.model.depth=4", "--config.model.num_heads=4",
               "--config.model.img_size=8", "--config.model.patch_size=2", "--config.model.num_classes=11",
               "--config.model.null_label=10", "--config.model.conv=False", "--config.data.image_size=64"]
UVIT_PIXEL = ["--config.model.embed_dim=64", "--config.model.depth=6", "--config.model.num_heads=4",
              "--config.model.img_size=32", "--config.model.patch_size=2", "--config.data.image_size=32"]
DIT_LATENT = ["--config.model.hidden_size=64", "--config.model.depth=4", "--config.model.num_heads=4",
              "--config.model.input_size=8", "--config.model.num_classes=10", "--config.data.image_size=64"]
TINY_T2I = [*TINY_MODEL["uvit"],
            "--config.model.img_size=8", "--config.model.clip_dim=32", "--config.data.image_size=64"]
IMAGENET64 = [*TINY_MODEL["uvit"],
              "--config.model.img_size=16", "--config.data.image_size=16"]

# released file -> (where its original-layout weights come from, tiny overrides, grid flags)
RELEASED_CASES = {
    "cifar10_uvit_small.pth": ("uvit_pixel_uncond", UVIT_PIXEL, ["--n_samples=2"]),
    "celeba64_uvit_small.pth": ("uvit_pixel_uncond", UVIT_PIXEL, ["--n_samples=2"]),
    "imagenet64_uvit_mid.pth": ("built", IMAGENET64, ["--labels=999,0"]),
    "imagenet64_uvit_large.pth": ("built", IMAGENET64, ["--labels=999,0"]),
    "imagenet256_uvit_large.pth": ("uvit_latent_cond", UVIT_LATENT, ["--labels=9,0"]),
    "imagenet256_uvit_huge.pth": ("uvit_latent_cond", UVIT_LATENT, ["--labels=9,0"]),
    "imagenet512_uvit_large.pth": ("uvit_latent_cond", UVIT_LATENT, ["--labels=9,0"]),
    "imagenet512_uvit_huge.pth": ("uvit_latent_cond", UVIT_LATENT, ["--labels=9,0"]),
    "mscoco_uvit_small.pth": ("built", TINY_T2I, ["--prompts", "the cat", "a dog and the cat"]),
    "mscoco_uvit_small_deep.pth": ("built", TINY_T2I, ["--prompts", "the cat"]),
    "DiT-XL-2-256x256.pt": ("dit_cond", DIT_LATENT, ["--labels=9,0"]),
    "DiT-XL-2-512x512.pt": ("dit_cond", DIT_LATENT, ["--labels=9,0"]),
    "SiT-XL-2-256x256.pt": ("sit_samplers", DIT_LATENT, ["--labels=9,0"]),  # weights saved by SiT's own code
    # REPA's SiT (projectors beside the network, 1000 classes, no learned sigma), saved by REPA's own code
    "last.pt": ("repa_sampler", [a for a in DIT_LATENT if "num_classes" not in a], ["--labels=9,0"]),
}


def test_every_released_file_has_a_case_and_a_config():
    assert set(RELEASED_CASES) == set(RELEASED)
    assert all(released_config(name).is_file() for name in RELEASED)
    assert released_config("my_model.pth") is None
    table = markdown_table()
    assert "| `DiT-XL-2-256x256.pt` | DiT-XL/2 | ImageNet 256 | `configs/imagenet256_dit_xl2.py` | ddpm | 250 | " \
           "w = 1.5 on 3 ch. | 2.27 |" in table


def released_overrides(name, tiny, tiny_ae, tiny_clip) -> list[str]:
    cfg = load_config(released_config(name))
    extra = [f"--config.autoencoder.pretrained={tiny_ae}"] if cfg.autoencoder.pretrained else []
    if cfg.text_encoder.pretrained:
        extra.append(f"--config.text_encoder.pretrained={tiny_clip}")
    return [*tiny, *extra, "--per_class=2", "--steps=3"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_file_loads_by_name(tmp_path, name, tiny_ae, tiny_clip):
    """The released file name alone picks the config; tiny widths come from --config.model overrides; the
    weights have the original repositories' key layout (fixtures written by the official code, or our model
    whose layout the backbone tests check against them)."""
    origin, tiny, flags = RELEASED_CASES[name]
    overrides = released_overrides(name, tiny, tiny_ae, tiny_clip)
    if origin == "built":
        cfg, _ = parse_command_line([f"--config={released_config(name)}", *tiny])
        state = perturbed(build_model(cfg.model), seed=0).state_dict()
    else:
        state = load_fixture(origin)["state_dict"]
    path = tmp_path / name
    torch.save(state, path)
    out = tmp_path / "grid.png"
    code, summary, err = run_main("--ckpt", path, *overrides, *flags, f"--out={out}")
    assert code == 0, err
    assert f"wrote {out}" in summary and name in summary and "EMA" in summary
    image = np.asarray(Image.open(out))
    assert image.std() > 10  # something was drawn


def test_t2i_checkpoint_keys_equal_the_original_layout():
    cfg, _ = parse_command_line([f"--config={released_config('mscoco_uvit_small.pth')}", *TINY_T2I,
                                 "--config.model.embed_dim=64", "--config.model.depth=4", "--config.model.num_heads=4",
                                 "--config.model.clip_dim=768"])
    ours = build_model(cfg.model).state_dict()
    original = load_fixture("uvit_t2i")["state_dict"]
    assert list(ours) == list(original)
    assert all(ours[k].shape == original[k].shape for k in ours)


# Sizes from docs/originals.md#u-vit-presets, #dit-presets (exact where given, else in millions to 0.01M).
# DiT-XL/2 at 512 has 64x64 latents: 1024 patches, so 768 more rows of the 1152-wide pos_embed than at 256.
FULL_SIZE = {"cifar10_uvit_small.pth": 44_255_328, "celeba64_uvit_small.pth": 44.29, "imagenet64_uvit_mid.pth": 130.94,
             "imagenet64_uvit_large.pth": 286.83, "imagenet256_uvit_large.pth": 286.76,
             "imagenet256_uvit_huge.pth": 500_832_016, "imagenet512_uvit_large.pth": 286.86,
             "imagenet512_uvit_huge.pth": 500.94, "mscoco_uvit_small.pth": 44.69, "mscoco_uvit_small_deep.pth": 58.35,
             "DiT-XL-2-256x256.pt": 675_129_632, "DiT-XL-2-512x512.pt": 675_129_632 + 768 * 1152,
             "SiT-XL-2-256x256.pt": 675_129_632,  # SiT-XL/2 is DiT-XL/2's network (learned sigma kept)
             "last.pt": 675_129_632 - (1152 + 1) * 2 * 2 * 4}  # REPA's: no learned-sigma outputs (final layer)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_builds_the_paper_model(name):
    cfg = load_config(released_config(name))
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    expected = FULL_SIZE[name]
    assert n == expected if isinstance(expected, int) else round(n / 1e6, 2) == expected
    if name.startswith(("DiT", "SiT")):
        assert len(model.state_dict()) == 292


def test_dit_training_checkpoint_uses_ema_unless_told(tmp_path, tiny_ae):
    fx = load_fixture("dit_cond")
    ema = fx["state_dict"]
    raw = {k: v + 0.05 * torch.randn_like(v) for k, v in ema.items()}
    opt = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(ema)))}]}
    training = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": argparse.Namespace(model="DiT-XL/2")}, training)
    torch.save(ema, tmp_path / "DiT-XL-2-256x256.pt")
    common = [*DIT_LATENT, f"--config.autoencoder.pretrained={tiny_ae}", "--steps=3", "--n_samples=2",
              "--chunk_size=2"]
    config = f"--config={released_config('DiT-XL-2-256x256.pt')}"
    code, _, err = run_main("--ckpt", training, *common, f"--out={tmp_path / 'x.npz'}")
    assert code == 2 and "--config" in err  # an unknown file name needs its config
    runs = {"ema": [training, config], "raw": [training, config, "--ema=false"],
            "released": [tmp_path / "DiT-XL-2-256x256.pt"]}
    for out, args in runs.items():
        code, _, err = run_main("--ckpt", *args, *common, f"--out={tmp_path / out}.npz")
        assert code == 0, err
    ema_run, raw_run, released = (npz(tmp_path / f"{k}.npz")["arr_0"] for k in runs)
    assert ema_run.shape == (2, 64, 64, 3)
    assert np.array_equal(ema_run, released) and not np.array_equal(ema_run, raw_run)


def test_mismatched_weights_name_the_keys(tmp_path, tiny_ae):
    path = tmp_path / "imagenet256_uvit_huge.pth"
    torch.save(load_fixture("uvit_latent_cond")["state_dict"], path)
    ae = f"--config.autoencoder.pretrained={tiny_ae}"
    code, _, err = run_main("--ckpt", path, *UVIT_LATENT, "--config.model.depth=2", ae)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "unexpected keys (24): in_blocks.1.norm1.weight" in err and "does not fit" in err
    code, _, err = run_main("--ckpt", path, *UVIT_LATENT, "--config.model.embed_dim=32", ae)
    assert code == 2 and "shape mismatches" in err and "pos_embed (1, 18, 64) vs (1, 18, 32)" in err


def test_trainer_checkpoint_dir_with_overrides_and_meta_class_counts(tmp_path, dit_file):
    cfg, _ = parse_command_line(DIT)
    state = torch.load(dit_file, weights_only=True)
    name, kwargs = resolve_model_kwargs(cfg.model)
    meta = {"model_name": name, "model_kwargs": kwargs, "image_shape": [1, 8, 8],
            "class_names": [f"digit{i}" for i in range(10)], "class_counts": [0] * 9 + [5]}
    save_checkpoint(tmp_path / "run", 7, model_state=state, ema_state=state, config=cfg, meta=meta, train_state={})
    code, _, err = run_main("--ckpt", tmp_path / "run", *DIT[:1], "--out", tmp_path / "g.png")
    assert code == 2 and "carries its own config" in err
    code, out, err = run_main("--ckpt", tmp_path / "run", "--config.sample.steps=2", "--per_class=1",
                              "--out", tmp_path / "g.png")
    assert code == 0 and "ddpm 2 steps" in out, err
    code, out, err = run_main("--ckpt", tmp_path / "run", "--config.sample.steps=2", "--label_dist=train_freq",
                              "--n_samples=6", "--out", tmp_path / "f.npz")
    assert code == 0, err
    assert npz(tmp_path / "f.npz")["arr_1"].tolist() == [9] * 6


# ----------------------------------------------------------------------------------------------------------
# Text-to-image
# ----------------------------------------------------------------------------------------------------------


def test_prompts_file_npz_with_tiny_clip_and_autoencoder(tmp_path, tiny_ae, tiny_clip):
    cfg, _ = parse_command_line([f"--config={released_config('mscoco_uvit_small.pth')}", *TINY_T2I])
    path = tmp_path / "t2i.pth"
    torch.save(perturbed(build_model(cfg.model), seed=0).state_dict(), path)
    (tmp_path / "captions.txt").write_text("the cat\n\na dog and the cat\nthe dog\n")
    args = ["--ckpt", path, f"--config={released_config('mscoco_uvit_small.pth')}", *TINY_T2I,
            f"--config.autoencoder.pretrained={tiny_ae}", f"--config.text_encoder.pretrained={tiny_clip}",
            "--steps=3", "--n_samples=4", f"--prompts_file={tmp_path / 'captions.txt'}"]
    code, out, err = run_main(*args, f"--out={tmp_path / 'coco.npz'}")
    assert code == 0, err
    assert "3 prompts" in out and "dpm_solver++ 3 steps, guidance 2" in out
    data = npz(tmp_path / "coco.npz")
    assert set(data) == {"arr_0"} and data["arr_0"].shape == (4, 64, 64, 3)
    assert not np.array_equal(data["arr_0"][0], data["arr_0"][3])  # same prompt, other noise


def test_grid_rows_from_cached_text_contexts(tmp_path):
    """Training previews of text models pass cached caption encodings instead of prompts."""
    cfg, _ = parse_command_line([f"--config={released_config('mscoco_uvit_small.pth')}", *TINY_T2I])
    cfg.sample.update(steps=2, per_class=3)
    model = perturbed(build_model(cfg.model), seed=0)
    objective = build_objective(cfg.diffusion)
    contexts, null_context = torch.randn(2, 77, 32), torch.zeros(77, 32)
    path = sample_grid(model, objective, cfg.sample, (4, 8, 8), tmp_path / "g.png", contexts=contexts,
                       null_context=null_context, decode=lambda z: z[:, :3].tanh(), batch_size=4)
    assert Image.open(path).size[1] == 2 * 50 + 2  # two rows of 8x8 cells upscaled to 48 px
    row = generate(model, objective, cfg.sample, (4, 8, 8), contexts=contexts[1:].expand(3, -1, -1),
                   null_context=null_context, indices=range(3, 6))  # cells 3..5: the second row
    pixels = np.asarray(Image.open(path))[52:100, 2:50]  # cell 3: row 1, column 0 (2 px padding)
    expected = ((row[0, :3].tanh().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(pixels[::6, ::6], expected)


# ----------------------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------------------


def test_help_exits_zero():
    proc = subprocess.run([sys.executable, "sample.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0 and "--label_dist" in proc.stdout and "released" in proc.stdout


@pytest.mark.parametrize("flags, message", [
    (["--prompts", "a red bus"], "prompts need a text-to-image model; this one is class-conditional"),
    (["--steps=0"], "steps must be a positive"),
    (["--sampler=heun"], "unknown sampler 'heun'"),
    (["--labels=3,12"], "labels [12] out of range"),
    (["--guidance_channels=two"], "guidance_channels must be"),
    (["--out=grid.jpg"], "must end in .png"),
    (["--png_dir=x"], "belong to .npz jobs"),
])
def test_bad_requests_are_one_line_errors(tmp_path, dit_file, flags, message):
    code, _, err = run_main("--ckpt", dit_file, *DIT, f"--out={tmp_path / 'g.png'}", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_guidance_needs_a_null_label(tmp_path):
    cfg, _ = parse_command_line([f"--config={released_config('imagenet64_uvit_mid.pth')}", *IMAGENET64])
    path = tmp_path / "imagenet64_uvit_mid.pth"  # 1000 classes, trained without label dropout
    torch.save(build_model(cfg.model).state_dict(), path)
    code, _, err = run_main("--ckpt", path, *IMAGENET64, "--guidance=1.5", f"--out={tmp_path / 'g.png'}")
    assert code == 2 and "guidance needs a model trained with a null label" in err


def test_labels_to_a_text_model_and_missing_prompts(tmp_path, tiny_ae, tiny_clip):
    cfg, _ = parse_command_line([f"--config={released_config('mscoco_uvit_small.pth')}", *TINY_T2I])
    path = tmp_path / "mscoco_uvit_small.pth"
    torch.save(build_model(cfg.model).state_dict(), path)
    args = ["--ckpt", path, *TINY_T2I, f"--config.autoencoder.pretrained={tiny_ae}",
            f"--config.text_encoder.pretrained={tiny_clip}"]
    code, _, err = run_main(*args, "--labels=1")
    assert code == 2 and "--labels needs a class-conditional model; this one is text-to-image" in err
    code, _, err = run_main(*args)
    assert code == 2 and "give --prompts" in err


def test_missing_checkpoint_and_unknown_weights_file(tmp_path):
    code, _, err = run_main("--ckpt", tmp_path / "nothing.pt")
    assert code == 2 and "checkpoint not found" in err
    (tmp_path / "mine.pt").write_bytes(b"")
    code, _, err = run_main("--ckpt", tmp_path / "mine.pt")
    assert code == 2 and "add --config" in err and "DiT-XL-2-256x256.pt" in err


def test_job_record_refuses_other_chunking(tmp_path):
    job = SampleJob.open(tmp_path / "s.npz", 10, {"a": 1}, chunk_size=4)
    job.write_record()
    assert SampleJob.open(tmp_path / "s.npz", 10, {"a": 1}).chunk_size == 4  # the recorded size by default
    with pytest.raises(ValueError, match="changed: chunk_size"):
        SampleJob.open(tmp_path / "s.npz", 10, {"a": 1}, chunk_size=5)
    with pytest.raises(ValueError, match="changed: num_samples"):
        SampleJob.open(tmp_path / "s.npz", 11, {"a": 1})


# ----------------------------------------------------------------------------------------------------------
# The loader behind sample.py
# ----------------------------------------------------------------------------------------------------------


def test_loader_gives_a_ready_model_from_a_trainer_checkpoint(tmp_path, dit_file):
    cfg, _ = parse_command_line(DIT)
    state = torch.load(dit_file, weights_only=True)
    save_checkpoint(tmp_path / "run", 3, model_state=state, ema_state=state, config=cfg, meta={}, train_state={})
    ready = load_for_sampling(tmp_path / "run", overrides=[("sample.steps", "4")], sample={"sampler": "ddim"})
    assert ready.source == (tmp_path / "run" / "checkpoints" / "step_00000003").resolve() and ready.weights == "ema"
    assert ready.image_shape == input_shape(cfg) == (1, 8, 8)  # the backbone's own input
    assert ready.conditioning == "class" and (ready.settings["sampler"], ready.settings["steps"]) == ("ddim", 4)
    assert not ready.model.training and ready.autoencoder is None and ready.decode is None
    assert all(torch.equal(v, state[k]) for k, v in ready.model.state_dict().items())
    with pytest.raises(ConfigError, match="unknown sampler 'heun'"):
        load_for_sampling(tmp_path / "run", sample={"sampler": "heun"})
    with pytest.raises(ConfigError, match="eta must be >= 0"):  # the samplers' own checks, before sampling
        load_for_sampling(tmp_path / "run", sample={"sampler": "ddim", "eta": -1.0})
    with pytest.raises(ConfigError, match="sample.eta=0.5 does not apply to sampler 'ddpm'"):
        load_for_sampling(tmp_path / "run", sample={"eta": 0.5})


def test_flag_words_and_label_syntax(tmp_path, dit_file):
    code, _, err = run_main("--ckpt", dit_file, *DIT, "--ema", "false", f"--out={tmp_path / 'g.png'}")
    assert code == 2 and "drop --ema false" in err  # a plain state_dict holds one set of weights
    code, _, err = run_main("--ckpt", dit_file, *DIT, "--labels=3,x", f"--out={tmp_path / 'g.png'}")
    assert code == 2 and "--labels takes class numbers" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main("--ckpt", dit_file, *DIT, "--clip_denoised=maybe")
    assert code == 2 and "bad value for --clip_denoised: expected a boolean" in err


# ----------------------------------------------------------------------------------------------------------
# The transport samplers' knobs: config keys and flags
# ----------------------------------------------------------------------------------------------------------

SIT_DEFAULTS = {"atol": 1e-6, "rtol": 1e-3, "diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "mean",
                "last_step_size": 0.04, "time_shift": 1.0, "guidance_t_lo": 0.0, "guidance_t_hi": 1.0}


def test_transport_knobs_are_config_keys_flags_and_sampler_keywords():
    """SiT's sample.py defaults in the schema, the same as Transport.sample's; one flag each; left out of the
    other objectives' calls and records at their defaults."""
    from diffusion.sampling.precision import PRECISION_KEYS
    from diffusion.sampling.settings import OPTION_KEYS, SAMPLER_SETTINGS, SHARED_KEYS

    cfg = load_config(released_config("SiT-XL-2-256x256.pt"))
    assert set(SIT_DEFAULTS) <= set(OPTION_KEYS)
    assert {key: cfg.sample[key] for key in SIT_DEFAULTS} == SIT_DEFAULTS
    transport = build_objective(cfg.diffusion)
    sde = transport.SAMPLER_OPTIONS["sde_euler"]
    assert {key: sde[key] for key in SIT_DEFAULTS if key in sde} == {k: v for k, v in SIT_DEFAULTS.items()
                                                                     if k not in ("atol", "rtol")}
    assert {key: transport.SAMPLER_OPTIONS["dopri5"][key] for key in ("atol", "rtol")} == {"atol": 1e-6, "rtol": 1e-3}
    flags = {flag.name for flag in sample.COMMAND.flags}
    assert set(OPTION_KEYS) <= flags and set(PRECISION_KEYS) <= flags <= flags | set(SAMPLER_SETTINGS)
    # precision and tf32 are sampler settings (flags, job records) but not keywords of objective.sample
    settings = sampler_settings(transport, cfg.sample)
    assert set(settings.kwargs) == {*SHARED_KEYS, *sde} - {"reverse"}
    assert settings.record == {**settings.kwargs, "precision": cfg.sample.precision, "tf32": cfg.sample.tf32}
    dit = load_config(released_config("DiT-XL-2-256x256.pt"))
    iddpm = build_objective(dit.diffusion)
    assert sampler_settings(iddpm, dit.sample).kwargs == {**{k: dit.sample[k] for k in SHARED_KEYS},
                                                          "clip_denoised": None}


def test_transport_knobs_are_refused_elsewhere_and_checked(tmp_path, dit_file):
    out = f"--out={tmp_path / 'g.png'}"
    code, _, err = run_main("--ckpt", dit_file, *DIT, "--time_shift=2", "--atol=1e-4", out)
    assert code == 2 and "sample.atol=0.0001 does not apply to sampler 'ddpm'" in err
    assert run_main("--ckpt", dit_file, *DIT, "--time_shift=1", "--steps=2", out)[0] == 0  # the default: accepted
    sit = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(load_fixture("sit_samplers")["state_dict"], sit)
    for flags, message in ((["--last_step=final"], "unknown last_step 'final'"),
                           (["--diffusion_form=cosine"], "unknown diffusion_form 'cosine'"),
                           (["--guidance_t_lo=0.9", "--guidance_t_hi=0.5"], "guidance_t_lo <= guidance_t_hi"),
                           (["--sampler=dopri5", "--rtol=0"], "rtol must be"),
                           (["--rtol=1e-2"], "sample.rtol=0.01 does not apply to sampler 'sde_euler'")):
        code, _, err = run_main("--ckpt", sit, *DIT_LATENT, "--config.autoencoder.pretrained=", "--steps=2", *flags,
                                out)
        assert code == 2 and message in err and "Traceback" not in err, (flags, err)


def test_sit_training_checkpoint_by_name_with_every_knob(tmp_path, tiny_ae, monkeypatch):
    """SiT's train.py checkpoint format under the released name: its EMA weights, and every knob from the flags
    reaching Transport.sample and the job record."""
    from diffusion.objectives.transport import Transport

    ema = load_fixture("sit_samplers")["state_dict"]
    raw = {k: v + 0.05 * torch.randn_like(v) for k, v in ema.items()}
    opt = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(ema)))}]}
    (tmp_path / "train").mkdir()
    (tmp_path / "plain").mkdir()
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": argparse.Namespace(model="SiT-XL/2")},
               tmp_path / "train" / "SiT-XL-2-256x256.pt")
    torch.save(ema, tmp_path / "plain" / "SiT-XL-2-256x256.pt")
    knobs = {"sampler": "sde_heun", "steps": 4, "diffusion_form": "linear", "diffusion_norm": 0.5,
             "last_step": "tweedie", "last_step_size": 0.1, "time_shift": 2.0, "guidance_t_lo": 0.25,
             "guidance_t_hi": 0.75}
    seen = []
    original = Transport.sample

    @functools.wraps(original)  # keeps the signature: the keys it takes are read from it
    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Transport, "sample", spy)
    common = [*DIT_LATENT, f"--config.autoencoder.pretrained={tiny_ae}", "--n_samples=2", "--chunk_size=2",
              "--labels=9,0", *(f"--{key}={value}" for key, value in knobs.items())]
    for kind in ("train", "plain"):
        code, _, err = run_main("--ckpt", tmp_path / kind / "SiT-XL-2-256x256.pt", *common,
                                f"--out={tmp_path / kind}.npz")
        assert code == 0, err
    assert all(seen[0][key] == value for key, value in knobs.items())
    assert seen[0]["guidance_scale"] == 1.5 and seen[0]["guidance_channels"] == "3"  # the config's paper sampler
    record = json.loads((tmp_path / "train.job.json").read_text())["settings"]["sampler"]
    assert all(record[key] == value for key, value in knobs.items())
    assert np.array_equal(npz(tmp_path / "train.npz")["arr_0"], npz(tmp_path / "plain.npz")["arr_0"])


def test_guidance_interval_is_in_sits_time():
    """guidance_t_lo / guidance_t_hi are SiT times (0 = noise, 1 = data) whatever the network's time scale."""
    from diffusion.objectives.transport import build_transport

    for scale in (1.0, 1000.0):
        calls = []

        def model(x, t, y, calls=calls, scale=scale):
            calls.append((float(t[0]) / scale, len(x)))
            return torch.zeros_like(x)

        objective = build_transport(time_scale=scale)
        noise, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
        objective.sample(model, noise, {"y": y}, null_cond={"y": torch.zeros_like(y)}, guidance_scale=2.0,
                         sampler="euler", steps=5, guidance_t_lo=0.3, guidance_t_hi=0.6)
        assert [(round(t, 4), n) for t, n in calls] == [(0.0, 2), (0.25, 2), (0.5, 4), (0.75, 2)]


def test_npz_job_size_defaults_to_the_configs_sample_count(tmp_path, dit_file):
    """sample.n_samples (U-ViT's MS-COCO configs: 30000) is an .npz job's size unless --n_samples says otherwise."""
    out = tmp_path / "s.npz"
    code, summary, err = run_main("--ckpt", dit_file, *DIT, *DDPM, "--config.sample.n_samples=3", "--chunk_size=2",
                                  f"--out={out}")
    assert code == 0, err
    assert npz(out)["arr_0"].shape[0] == 3 and "3 samples" in summary
