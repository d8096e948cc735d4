"""What the tests share: paths and parity fixtures, the tiny training configs, tiny codecs saved the way released
weights are, and small datasets written in their real on-disk formats. Test modules import from here only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion.config.cli import parse_command_line

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # computed with the official code; see fixtures/README.md
DIGITS_EXTRACTOR = ["--extractor", "digits", "--num_workers", "0"]  # eval_fid.py on the quickstart's features


def load_fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing from the repository")
    return torch.load(path, weights_only=True)


def fixture_network(name: str, cls) -> tuple[torch.nn.Module, dict]:
    """(``cls`` built from the fixture's config with its state_dict loaded strictly, in eval mode; the fixture)."""
    fx = load_fixture(name)
    model = cls(**fx["config"]).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    return model, fx


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|: the fixtures README's measure for outputs of large magnitude (samplers)."""
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# The documentation: README.md and the pages under docs/
# ----------------------------------------------------------------------------------------------------------------
def doc_pages() -> list[Path]:
    """README.md and every docs/*.md page, the places the documentation's claims live."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every markdown heading of ``text``, outside fenced code blocks."""
    headings, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"(#+) (.+)$", line)):
            headings.append((i, len(m.group(1)), m.group(2).strip()))
    return headings


def doc_section(title: str) -> str:
    """The section headed ``title`` (any level) in README.md or a docs page, up to the next heading of its level or
    above; the test fails unless exactly one page has that heading exactly once."""
    found = []
    for page in doc_pages():
        lines = page.read_text().splitlines()
        headings = doc_headings("\n".join(lines))
        for k, (i, level, name) in enumerate(headings):
            if name == title:
                end = next((j for j, lv, _ in headings[k + 1:] if lv <= level), len(lines))
                found.append((page, "\n".join(lines[i:end])))
    assert len(found) == 1, f"section {title!r} found {len(found)} times: {[str(p) for p, _ in found]}"
    return found[0][1]


# ----------------------------------------------------------------------------------------------------------------
# Tiny training runs on the bundled digits
# ----------------------------------------------------------------------------------------------------------------
TINY_MODEL = {
    "uvit": ["--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2"],
    "dit": ["--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2"],
}
TINY_RUN = ["--config.wandb.mode=disabled", "--config.train.sample_every=0", "--config.eval.metric=",
            "--config.eval.every=0", "--config.sample.steps=4", "--config.sample.per_class=2",
            "--config.train.batch_size=32"]
TINY_UVIT = [*TINY_MODEL["uvit"], *TINY_RUN]
TINY_DIT = [*TINY_MODEL["dit"], *TINY_RUN]


def launch_train(workdir, *args, processes: int = 2) -> subprocess.CompletedProcess:
    """train.py under ``accelerate launch`` with ``processes`` CPU processes (DDP over gloo, one thread each)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "train.py", *args,
           f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def make_tiny_dinov2(path, seed: int = 0) -> Path:
    """A tiny DINOv2-S layout (1 block, width 64) with the released models' 518 px position table, saved as a .pth
    in timm's key layout; returns the path."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518, num_classes=0, depth=1,
                              embed_dim=64, num_heads=1)
    with torch.no_grad():  # layer scale 1e-5 would hide the block
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    torch.save(model.state_dict(), path)
    return Path(path)


def tiny_config(*overrides, config: str = "configs/digits_uvit.py"):
    """The config file with a tiny backbone of its kind and a quiet, short run; ``overrides`` come last."""
    tiny = TINY_DIT if "dit" in Path(config).stem else TINY_UVIT
    cfg, _ = parse_command_line([f"--config={REPO / config}", *tiny, *overrides])
    return cfg


def logged_losses(workdir: Path) -> list[float]:
    return [float(m) for m in re.findall(r"loss ([0-9.]+)", (workdir / "log.txt").read_text())]


# ----------------------------------------------------------------------------------------------------------------
# Tiny, randomly initialised codecs of the real library classes, saved to disk the way released weights are.
# No network here, so tests load these through exactly the code paths real weights take: a diffusers
# ``AutoencoderKL`` folder (like ``stabilityai/sd-vae-ft-ema``), the same weights as a U-ViT-style ``.pth`` in the
# original latent-diffusion key layout, and a transformers CLIP text model + byte-level BPE tokenizer folder (like
# ``openai/clip-vit-large-patch14``).
# ----------------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------------
# Autoencoder
# ----------------------------------------------------------------------------------------------------------------
# Same block structure as the SD KL-f8 VAE (4 levels: downsample 8, 4 latent channels, mid attention), tiny widths.
# Unequal widths so that the resnet shortcut convs (``nin_shortcut``) exist and their key mapping gets tested.
TINY_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=1, norm_num_groups=4, sample_size=32)


def make_tiny_autoencoder(folder, seed: int = 0) -> Path:
    """A seeded tiny ``AutoencoderKL`` saved with ``save_pretrained(folder)``; returns the folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    with torch.no_grad():  # default init gives near-constant outputs; spread the weights so every layer matters
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(folder)
    return Path(folder)


def _diffusers_to_ldm_key(key: str, num_levels: int) -> str:
    """One diffusers ``AutoencoderKL`` key -> the latent-diffusion key (the inverse of diffusers'
    ``convert_ldm_vae_checkpoint``, which the package ships only in the LDM -> diffusers direction)."""
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    # Decoder up blocks are numbered from the bottom in LDM and from the top in diffusers.
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                 lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for new, old in attention.items():
        key = key.replace(f".mid_block.attentions.0.{new}.", f".mid.attn_1.{old}.")
    return key


def ldm_state_dict(folder) -> dict[str, torch.Tensor]:
    """The weights of a diffusers ``AutoencoderKL`` folder in the original latent-diffusion layout, where the mid
    attention's q/k/v/proj_out are 1x1 convolutions."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder)
    num_levels = len(vae.config.block_out_channels)
    state = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = _diffusers_to_ldm_key(key, num_levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[ldm_key] = tensor.clone()
    return state


def write_ldm_single_file(folder, path, prefix: str = "") -> Path:
    """Write the weights of ``folder`` as one original-format file: a plain state_dict ``.pth`` like U-ViT's
    ``autoencoder_kl.pth``; with ``prefix="first_stage_model."`` a Stable Diffusion style full checkpoint
    (``{"state_dict": {...}, "global_step": ...}`` holding other models' keys too). ``.safetensors`` paths get a flat
    file."""
    state = {prefix + k: v for k, v in ldm_state_dict(folder).items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif prefix:
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 4, 3, 3)  # the UNet it ships with
        torch.save({"state_dict": state, "global_step": 1}, path)
    else:
        torch.save(state, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder
# ----------------------------------------------------------------------------------------------------------------
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"),
               ("do", "g</w>")]


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary layout on a small scale: 256 byte symbols, the same with ``</w>``, merge results, specials."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in TINY_MERGES] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return vocab, [" ".join(pair) for pair in TINY_MERGES]


def make_tiny_clip(folder, seed: int = 0, hidden_size: int = 32) -> Path:
    """A seeded tiny ``CLIPTextModel`` and a working ``CLIPTokenizer`` (real byte-level BPE files), saved with
    ``save_pretrained(folder)``; returns the folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    CLIPTextModel(config).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# FID Inception
# ----------------------------------------------------------------------------------------------------------------


def make_random_fid_inception(path, seed: int = 0) -> Path:
    """pytorch-fid's FID Inception architecture with random weights, saved as a plain state_dict ``.pth`` like
    ``pt_inception-2015-12-05-6726825d.pth``; returns the path.

    Full size (its 2048/1008/2023-d outputs are what the code under test handles), so no smaller version exists.
    Random convolutions would shrink or blow up the signal over ~90 layers, so the BatchNorm running statistics are
    set from one train-mode forward of smooth random images: the features then vary like real ones."""
    from diffusion.evaluation.inception import build_fid_inception

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    net = build_fid_inception()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (2.0 / max(p[0].numel(), 1)) ** 0.5)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average: one batch sets the running statistics
                module.reset_running_stats()
        smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=generator), size=(299, 299),
                                                 mode="bilinear") * 2 - 1
        net.train()(smooth)
    torch.save(net.eval().state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Small datasets in their real on-disk formats
# ----------------------------------------------------------------------------------------------------------------
FILES = {"n01": ("a.png", "b.JPEG", "c_gray.png"), "n02": ("a.JPEG", "b_truncated.JPEG", "c.png", "d.JPEG")}


def write_imagefolder(root: Path) -> Path:
    """Random images of assorted sizes and aspect ratios, as PNG and JPEG, one grayscale, one truncated JPEG."""
    rng = np.random.default_rng(0)
    for wnid, names in FILES.items():
        (root / wnid).mkdir(parents=True)
        for name in names:
            height, width = rng.integers(12, 48, size=2)
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            if "gray" in name:
                image = image.convert("L")
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG" if name.endswith("JPEG") else "PNG")
            data = buffer.getvalue()
            (root / wnid / name).write_bytes(data[: len(data) // 2] if "truncated" in name else data)
    return root


RED, GREEN = (220, 30, 30), (30, 180, 60)
# (image id, (width, height), number of captions); image 30 has no caption and is left out.
COCO_IMAGES = [(9, (40, 24), 5), (3, (24, 40), 6), (25, (32, 32), 7), (7, (48, 20), 5), (30, (20, 20), 0)]


def write_coco(root: Path, split: str = "train") -> Path:
    """Official 2014 layout: JPEGs whose long side has RED margins outside the centre square, which is GREEN, and
    the captions JSON (annotations in shuffled order)."""
    folder = root / f"{split}2014"
    folder.mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations, ann_id = [], [], 100
    for image_id, (width, height), num_captions in COCO_IMAGES:
        arr = np.full((height, width, 3), RED, dtype=np.uint8)
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        arr[top : top + side, left : left + side] = GREEN
        name = f"COCO_{split}2014_{image_id:012d}.jpg"
        Image.fromarray(arr).save(folder / name, quality=100, subsampling=0)
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": height, "width": width,
                       "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        for j in range(num_captions):
            ann_id += 7
            annotations.append({"image_id": image_id, "id": ann_id, "caption": f"the cat {image_id} and dog {j}"})
    order = np.random.default_rng(0).permutation(len(annotations))
    captions = {"info": {"description": "COCO 2014 Dataset"}, "images": images, "licenses": [],
                "annotations": [annotations[i] for i in order]}
    (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(captions))
    return root


# ----------------------------------------------------------------------------------------------------------
# Processes: scripts on one thread each, launched, killed mid-way; what an extraction wrote
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    """In-process runs on one thread, as the launched processes (OMP_NUM_THREADS=1), so their numbers are bitwise
    comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_script(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root on one thread per process, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def launch_script(num_processes: int, script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``script`` under ``accelerate launch`` with ``num_processes`` CPU processes on a free port."""
    with socket.socket() as s:  # a free port: other test runs may be using accelerate's default one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={num_processes}",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={port}",
           script, *args]
    return run_script(cmd)


def kill_when(cmd: list[str], ready, log: Path, timeout: float = 300) -> int:
    """Start ``cmd`` as :func:`run_script` does and SIGKILL it once ``ready()`` holds; -> its return code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as stderr:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        return process.wait()


def kill_extraction_after_first_shard(args: list[str], blocking: Path, out: Path, log: Path) -> int:
    """``scripts/extract_latents.py ARGS`` with the image file ``blocking`` (the first of shard 1) replaced by a named
    pipe: reading it blocks, so the run holds still right after writing shard 0 and is SIGKILLed there; the image
    is put back. -> the return code."""
    image = blocking.read_bytes()
    blocking.unlink()
    os.mkfifo(blocking)
    try:
        return kill_when([sys.executable, "scripts/extract_latents.py", *args],
                         lambda: (out / "shard_000000.json").exists(), log)
    finally:
        blocking.unlink()
        blocking.write_bytes(image)


def stored_shards(out: Path) -> dict[str, torch.Tensor]:
    """Every shard's tensors of an extraction, concatenated in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = defaultdict(list)
    for shard in manifest["shards"]:
        for key, tensor in load_file(out / shard["file"]).items():
            parts[key].append(tensor)
    return {key: torch.cat(tensors) for key, tensors in parts.items()}


def run_sample(*argv) -> tuple[int, str, str]:
    """sample.py in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    import sample

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = sample.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()
