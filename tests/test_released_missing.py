"""A released checkpoint's name that is not on disk: sample.py says where it looked, which checkpoint the name is, and
the original's download command (URLs as DiT's download.py, SiT's README/download.py, REPA's utils.py and U-ViT's
README give them); other missing names keep the plain message."""

from __future__ import annotations

import pytest

from diffusion.released import RELEASED, download_command
from tests.helpers import run_sample

# The originals' links (github.com/facebookresearch/DiT download.py, willisma/SiT download.py and README,
# sihyun-yu/REPA utils.py download_model, baofff/U-ViT README's table).
ORIGINAL_URLS = {
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt",
    "SiT-XL-2-256x256.pt": "https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                           "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0",
    "last.pt": "https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
               "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0",
    "imagenet256_uvit_huge.pth": "https://drive.google.com/file/d/13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u/view?usp=share_link",
}


def missing(tmp_path, monkeypatch, name: str) -> str:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_sample(f"--ckpt={name}")
    assert code == 2 and out == "" and "Traceback" not in err and err.startswith("error: checkpoint not found: ")
    return err


@pytest.mark.parametrize("name", ["SiT-XL-2-256x256.pt", "last.pt", "DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"])
def test_a_missing_released_file_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch, name):
    err = missing(tmp_path, monkeypatch, name)
    where = tmp_path / name
    assert f"(looked at {where})" in err and f"the released {RELEASED[name].model}" in err
    assert f"wget -O {where} " in err and ORIGINAL_URLS[name] in err and RELEASED[name].config in err
    assert "pretrained_models" not in err  # nothing lies in the originals' download folder


def test_every_released_file_has_its_originals_link():
    assert all(entry.url.startswith("https://") for entry in RELEASED.values())
    for name, url in ORIGINAL_URLS.items():
        assert RELEASED[name].url == url, name
    uvit = download_command("imagenet256_uvit_huge.pth", "ckpts/imagenet256_uvit_huge.pth")
    assert uvit.startswith("pip install gdown && gdown 13StUdrjaaSXjfqqF7M47BzPyhMAArQ4u -O "
                           "ckpts/imagenet256_uvit_huge.pth") and ORIGINAL_URLS["imagenet256_uvit_huge.pth"] in uvit
    assert download_command("other.pt", "other.pt") == ""


def test_the_originals_download_folder_is_pointed_at(tmp_path, monkeypatch):
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models" / "DiT-XL-2-256x256.pt").write_bytes(b"")  # where DiT's download.py saves it
    err = missing(tmp_path, monkeypatch, "DiT-XL-2-256x256.pt")
    assert f"it lies in {tmp_path / 'pretrained_models' / 'DiT-XL-2-256x256.pt'}" in err
    assert "--ckpt=pretrained_models/DiT-XL-2-256x256.pt" in err


def test_other_missing_names_keep_the_plain_message(tmp_path, monkeypatch):
    assert missing(tmp_path, monkeypatch, "my_model.pt") == "error: checkpoint not found: my_model.pt\n"
