"""The checkpoints the U-ViT, DiT, SiT and REPA papers released, by file name, and the config that reproduces each
paper number.

``sample.py --ckpt=<released file>`` needs no ``--config``: the file name picks the config below (model, diffusion,
autoencoder and the paper's sampler in ``config.sample``); ``--config.x=v`` overrides still apply. Rename a file and
``--config`` is needed again. ``python -m diffusion.released`` prints the table in markdown (docs/sampling.md).

A released name that is not on disk is refused with where it was looked for and the original's download command
(:func:`missing_checkpoint`): nothing is downloaded at run time.

Some files hold more than the sampling network: REPA's SiT carries its alignment projectors (``projectors.*``, used
by the training loss only). ``sampling_state_dict(file_name, state)`` drops what a released file's entry lists in
``ignored``, so that the rest loads strictly into the backbone its config builds.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from diffusion.errors import InputNotFoundError

REPO = Path(__file__).resolve().parents[1]
DIT_MODELS = "https://dl.fbaipublicfiles.com/DiT/models/"  # DiT's download.py: web_path = DIT_MODELS + file name
UVIT_DRIVE = "https://drive.google.com/file/d/{}/view?usp=share_link"  # U-ViT's README table, one file id per row


@dataclass(frozen=True)
class Released:
    config: str  # relative to the repository root
    model: str
    dataset: str
    paper_fid: float
    ignored: tuple[str, ...] = ()  # key prefixes of the file that sampling does not use
    url: str = ""  # where the original repository downloads it from
    origin: str = ""  # the original's file that names the url


# File names exactly as the U-ViT (github.com/baofff/U-ViT), DiT (github.com/facebookresearch/DiT) and SiT
# (github.com/willisma/SiT) READMEs link them. U-ViT files are plain EMA state_dicts (.pth); DiT's and SiT's are plain
# EMA state_dicts (.pt) of the same DiT key layout (SiT's training checkpoints: {"model", "ema", "opt", "args"}).
# REPA's (github.com/sihyun-yu/REPA) has no README link: generate.py downloads it when no --ckpt is given
# (utils.download_model('last.pt'), saved as pretrained_models/last.pt, the name its Dropbox link ends in) and loads it
# as a plain state_dict: SiT-XL/2 in DiT's key layout without the learned-sigma half, trained in REPA's time
# direction, plus ``projectors.0.{0,2,4}`` (REPA's train.py checkpoints: {"model", "ema", "opt", "args", "steps"}).
# "last.pt" is a generic name: any other file so named needs --config.
RELEASED: dict[str, Released] = {
    "cifar10_uvit_small.pth": Released("configs/cifar10_uvit_s2.py", "U-ViT-S/2", "CIFAR-10 32", 3.11,
                                       url=UVIT_DRIVE.format("1yoYyuzR_hQYWU0mkTj659tMTnoCWCMv-")),
    "celeba64_uvit_small.pth": Released("configs/celeba64_uvit_s4.py", "U-ViT-S/4", "CelebA 64", 2.87,
                                        url=UVIT_DRIVE.format("13YpbRtlqF1HDBNLNRlKxLTbKbKeLE06C")),
    "imagenet64_uvit_mid.pth": Released("configs/imagenet64_uvit_m4.py", "U-ViT-M/4", "ImageNet 64", 5.85,
                                        url=UVIT_DRIVE.format("1igVgRY7-A0ZV3XqdNcMGOnIGOxKr9azv")),
    "imagenet64_uvit_large.pth": Released("configs/imagenet64_uvit_l4.py", "U-ViT-L/4", "ImageNet 64", 4.26,
                                          url=UVIT_DRIVE.format("19rmun-T7RwkNC1feEPWinIo-1JynpW7J")),
    "imagenet256_uvit_large.pth": Released("configs/imagenet256_uvit_l2.py", "U-ViT-L/2", "ImageNet 256", 3.40,
                                           url=UVIT_DRIVE.format("1w7T1hiwKODgkYyMH9Nc9JNUThbxFZgs3")),
    "imagenet256_uvit_huge.pth": Released("configs/imagenet256_uvit_h2.py", "U-ViT-H/2", "ImageNet 256", 2.29,
                                          url=UVIT_DRIVE.format("13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u")),
    "imagenet512_uvit_large.pth": Released("configs/imagenet512_uvit_l4.py", "U-ViT-L/4", "ImageNet 512", 4.67,
                                           url=UVIT_DRIVE.format("1mkj4aN2utHMBTWQX9l1nYue9vleL7ZSB")),
    "imagenet512_uvit_huge.pth": Released("configs/imagenet512_uvit_h4.py", "U-ViT-H/4", "ImageNet 512", 4.05,
                                          url=UVIT_DRIVE.format("1uegr2o7cuKXtf2akWGAN2Vnlrtw5YKQq")),
    "mscoco_uvit_small.pth": Released("configs/mscoco_uvit_s2.py", "U-ViT-S/2 (T2I)", "MS-COCO 256", 5.95,
                                      url=UVIT_DRIVE.format("15JsZWRz2byYNU6K093et5e5Xqd4uwA8S")),
    "mscoco_uvit_small_deep.pth": Released("configs/mscoco_uvit_s2_deep.py", "U-ViT-S/2-Deep (T2I)", "MS-COCO 256",
                                           5.48, url=UVIT_DRIVE.format("1gHRy8sn039Wy-iFL21wH8TiheHK8Ky71")),
    "DiT-XL-2-256x256.pt": Released("configs/imagenet256_dit_xl2.py", "DiT-XL/2", "ImageNet 256", 2.27,
                                    url=DIT_MODELS + "DiT-XL-2-256x256.pt", origin="DiT's download.py"),
    "DiT-XL-2-512x512.pt": Released("configs/imagenet512_dit_xl2.py", "DiT-XL/2", "ImageNet 512", 3.04,
                                    url=DIT_MODELS + "DiT-XL-2-512x512.pt", origin="DiT's download.py"),
    "SiT-XL-2-256x256.pt": Released(
        "configs/imagenet256_sit_xl2.py", "SiT-XL/2", "ImageNet 256", 2.06, origin="SiT's README and download.py",
        url="https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
            "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"),
    "last.pt": Released(
        "configs/imagenet256_sit_xl2_repa.py", "SiT-XL/2 + REPA", "ImageNet 256", 1.42, ignored=("projectors.",),
        origin="REPA's utils.py (download_model)",
        url="https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
            "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0"),
}


def released_config(file_name: str) -> Path | None:
    """The config file that describes the released checkpoint named ``file_name``; None for other names."""
    entry = RELEASED.get(file_name)
    return REPO / entry.config if entry else None


def download_command(file_name: str, path: str | Path) -> str:
    """The shell command that fetches the released file ``file_name`` to ``path`` from where the original gets it
    ("" for other names). Google Drive (U-ViT) serves large files only after a confirmation page: gdown passes it."""
    entry = RELEASED.get(file_name)
    if entry is None:
        return ""
    if entry.url.startswith("https://drive.google.com/"):
        file_id = entry.url.split("/d/")[1].split("/")[0]
        return f"pip install gdown && gdown {file_id} -O {shlex.quote(str(path))}  # or a browser: {entry.url}"
    return f"wget -O {shlex.quote(str(path))} {shlex.quote(entry.url)}"


def missing_checkpoint(path: str | Path) -> InputNotFoundError:
    """The error for a checkpoint ``path`` that is not there: with a released file's name, where it was looked for,
    which checkpoint that name is and the original's download command (where the originals' own scripts keep it,
    ``pretrained_models/``, if it lies there)."""
    path = Path(path)
    entry = RELEASED.get(path.name)
    if entry is None:
        return InputNotFoundError(f"checkpoint not found: {path}")
    where = path.expanduser().absolute()
    origin = entry.origin or "U-ViT's README"
    kept = Path("pretrained_models") / path.name  # where DiT's, SiT's and REPA's download scripts save it
    hint = f"; it lies in {kept.absolute()} (the originals' download folder): --ckpt={kept}" \
        if kept.is_file() and kept.absolute() != where else ""
    return InputNotFoundError(
        f"checkpoint not found: {path} (looked at {where}){hint}. {path.name} is the name of the released "
        f"{entry.model} ({entry.dataset}, paper FID {entry.paper_fid:.2f}); nothing is downloaded at run time. Get "
        f"it once (the link in {origin}):\n  {download_command(path.name, where)}\nthen --ckpt={where} (keep the "
        f"file name: it picks the config, {entry.config})")


def sampling_state_dict(file_name: str, state: dict) -> dict:
    """``state`` without the keys that the released file ``file_name`` holds besides its sampling network (its
    entry's ``ignored`` prefixes: REPA's projectors); other names come back as they are."""
    entry = RELEASED.get(file_name)
    if entry is None or not entry.ignored:
        return state
    return {k: v for k, v in state.items() if not k.startswith(entry.ignored)}


def _guidance(sample_cfg) -> str:
    if sample_cfg.guidance_scale == 1.0:
        return "none"
    channels = "" if sample_cfg.guidance_channels == "all" else f" on {sample_cfg.guidance_channels} ch."
    lo, hi = sample_cfg.get("guidance_t_lo", 0.0), sample_cfg.get("guidance_t_hi", 1.0)
    window = "" if (lo, hi) == (0.0, 1.0) else f", t in [{lo:g}, {hi:g}]"
    return f"w = {sample_cfg.guidance_scale:g}{channels}{window}"


def markdown_table() -> str:
    """The released checkpoints with the sampler defaults their configs carry (``sample.py``'s defaults)."""
    from diffusion.config.loading import load_config

    rows = ["| file | model | data | config | sampler | steps | guidance | paper FID |",
            "|---|---|---|---|---|---|---|---|"]
    for name, entry in RELEASED.items():
        sample = load_config(REPO / entry.config).sample
        rows.append(f"| `{name}` | {entry.model} | {entry.dataset} | `{entry.config}` | {sample.sampler} | "
                    f"{sample.steps} | {_guidance(sample)} | {entry.paper_fid:.2f} |")
    note = ("Guidance is written as w in eps_u + w (eps_c - eps_u); U-ViT's papers write s = w - 1. FID on 50K samples "
            "(30K for MS-COCO) with EMA weights.")
    return "\n".join(rows) + "\n\n" + note


if __name__ == "__main__":
    print(markdown_table())
