"""pytorch-fid's FID Inception, loaded from a file without network access, giving pool3, logits and sFID features.

The network is exactly ``pytorch_fid.inception.fid_inception_v3()`` (torchvision's InceptionV3 with 1008 classes and
pytorch-fid's FID blocks, the port of TensorFlow's inception-2015-12-05 graph), except that the weights
``pt_inception-2015-12-05-6726825d.pth`` are read from a path, by default where pytorch-fid's own download puts them
(``torch.hub.get_dir()/checkpoints/``), instead of being downloaded. Images reach it through one of two front ends
(the evaluation protocol's, ``diffusion.evaluation.protocols``):

    pytorch_fid  pytorch-fid's: uint8 / 255, ``F.interpolate`` bilinear to 299 x 299 (half-pixel centres), 2 x - 1
    adm          ADM's evaluator: float [0, 255] into TF1's ResizeBilinear to 299 x 299 (align_corners=False and no
                 half-pixel centres: output pixel i samples input coordinate i * in / out), then (x - 128) / 128, as
                 the graph ``classify_image_graph_def.pb`` does after its ``ExpandDims:0`` input

One forward gives

    pool     (N, 2048)  the final average pool (pool3): FID, precision/recall
    logits   (N, 1008)  pool3 times the softmax weights, without the bias, as ADM's evaluator (its IS)
    spatial  (N, 2023)  the first 7 channels of Mixed_6d's 1x1 branch (conv-BN-ReLU), 17 x 17, flattened in
                        (h, w, c) order: ADM's ``mixed_6/conv`` [..., :7] (sFID)
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_fid.inception import (
    FID_WEIGHTS_URL,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
    _inception_v3,
)
from torch import nn

from diffusion.errors import CheckpointError, InceptionWeightsNotFoundError

WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[1]  # pt_inception-2015-12-05-6726825d.pth
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7
FRONT_ENDS = ("pytorch_fid", "adm")
# The network in data-flow order, up to pool3 (pytorch-fid's blocks 0-3).
LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
          "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
          "Mixed_7b", "Mixed_7c", "avgpool")


def default_weights_path() -> Path:
    """Where pytorch-fid's own download leaves the weights: ``torch.hub.get_dir()/checkpoints/<file>`` (follows
    ``TORCH_HOME`` / ``XDG_CACHE_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def build_fid_inception() -> nn.Module:
    """The FID Inception architecture with untrained weights: ``pytorch_fid.inception.fid_inception_v3()`` without
    its download."""
    inception = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


def load_fid_inception(weights: str | os.PathLike = "") -> tuple[nn.Module, Path]:
    """-> (the FID Inception in eval mode with the weights of ``weights`` ("" = :func:`default_weights_path`), the
    file read). Missing file: :class:`InceptionWeightsNotFoundError`; a file of other weights: ValueError."""
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise InceptionWeightsNotFoundError(
            f"FID Inception weights not found at {path}. There is no download here: fetch {FID_WEIGHTS_URL} (the file "
            f"pytorch-fid uses, 91 MB) and put it at {default_weights_path()} (pytorch-fid's torch-hub cache; "
            f"TORCH_HOME moves it), or pass its path with --inception PATH / --config.eval.inception_weights=PATH.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    inception = build_fid_inception()
    expected = inception.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not the FID Inception's state_dict "
                              f"({WEIGHTS_FILE})")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path} is not the FID Inception's state_dict ({WEIGHTS_FILE}): {len(missing)} "
                              f"missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                              f"{len(shapes)} of other shapes {shapes[:3]}")
    inception.load_state_dict(state)
    return inception.eval().requires_grad_(False), path


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 of a weights file (memoised per size and mtime): which Inception made a set of features."""
    stat = path.stat()
    return _file_digest(os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns)


def resize_bilinear_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1's ``ResizeBilinear`` (``align_corners=False``, ``half_pixel_centers=False``) of float32 (N, C, H, W)
    images to (size, size), with TensorFlow's float32 arithmetic in its order: ``scale = in / out``, source
    coordinate ``i * scale``, its floor and the next pixel (clamped to the edge), then ``top = tl + (tr - tl) dx``,
    ``bottom = bl + (br - bl) dx``, ``top + (bottom - top) dy`` (so it equals TensorFlow's output exactly; see
    tests/fixtures/tf_resize.pt). Rows are interpolated once per input row, then between rows."""

    def taps(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(length / size, dtype=torch.float32)  # = float32(in) / float32(out), correctly rounded
        source = torch.arange(size, dtype=torch.float32, device=images.device) * scale.to(images.device)
        low = source.floor()
        return low.long(), (low.long() + 1).clamp(max=length - 1), source - low

    if images.dtype != torch.float32 or images.ndim != 4:
        raise ValueError(f"expected float32 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
    y0, y1, dy = taps(images.shape[2])
    x0, x1, dx = taps(images.shape[3])
    left, right = images[..., x0], images[..., x1]
    rows = left + (right - left) * dx  # (N, C, H, size): the top and bottom terms of every input row
    top, bottom = rows[..., y0, :], rows[..., y1, :]
    return top + (bottom - top) * dy[:, None]


class FIDInception(nn.Module):
    """pool3, logits and spatial features of float32 (N, 3, H, W) images on the [0, 255] scale, through the
    ``front_end`` (pytorch_fid or adm, see the module docstring)."""

    def __init__(self, inception: nn.Module, front_end: str = "pytorch_fid") -> None:
        super().__init__()
        if front_end not in FRONT_ENDS:
            raise ValueError(f"unknown Inception front end {front_end!r}; choose one of {', '.join(FRONT_ENDS)}")
        self.inception, self.front_end = inception, front_end

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 255] images -> the network's 299 x 299 input."""
        if self.front_end == "adm":
            return (resize_bilinear_tf1(images) - 128) / 128
        x = F.interpolate(images / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(self.prepare(images))

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of the network's 299 x 299 input (after the front end)."""
        spatial = None
        for name in LAYERS:
            if name == "Mixed_6d":  # its 1x1 branch run again (one small convolution) rather than a hook
                spatial = self.inception.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
            x = getattr(self.inception, name)(x)
        pool = x.flatten(1)  # (N, 2048)
        return {"pool": pool, "logits": pool @ self.inception.fc.weight.T,
                "spatial": spatial.permute(0, 2, 3, 1).flatten(1)}


class InceptionFeatures:
    """:class:`FIDInception` as a feature network (see ``diffusion.evaluation.extractors``); ``id`` =
    ``inception-<sha256[:12]>`` of the weights file, with ``-adm`` appended under ADM's front end (its features
    differ, so do its caches)."""

    dims = {"pool": 2048, "logits": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}

    def __init__(self, weights: str | os.PathLike = "", device: torch.device | str = "cpu",
                 front_end: str = "pytorch_fid") -> None:
        inception, self.weights_path = load_fid_inception(weights)
        self.device = torch.device(device)
        self.network = FIDInception(inception, front_end).to(self.device)
        self.id = f"inception-{weights_digest(self.weights_path)[:12]}{'' if front_end == 'pytorch_fid' else '-adm'}"

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] == 1:  # grey, read as RGB like pytorch-fid's loader does
            images = images.expand(-1, -1, -1, 3)
        # contiguous NCHW on [0, 255] (pytorch-fid: then / 255, as torchvision's ToTensor in its loader; the memory
        # layout picks the convolution kernels, so it decides the last bits)
        return self.network(images.permute(0, 3, 1, 2).contiguous().float())
