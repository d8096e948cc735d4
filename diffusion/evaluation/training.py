"""What the trainer evaluates: FID during training (the EMA model sampled exactly as the config's evaluation sampler
says), its history in ``fid.json``, and the end-of-run check ``eval.metric``.

U-ViT's recipe is FID on 10K samples every few checkpoints and FID-50K on the best one afterwards. The scores that
select the checkpoint are drawn with the config's ``sample`` section with ``eval.sampler`` / ``eval.steps`` /
``eval.guidance_scale`` on top where set (``selection_sample_config``: U-ViT selected with DPM-Solver at 50
evaluations, unguided but for MS-COCO); the best checkpoint's final score uses the ``sample`` section as it stands,
the settings behind the paper number. A ``sample.guide`` (autoguidance) is loaded once and guides both (the
``eval.*`` keys do not change it). Labels follow ``sample.labels`` (uniform, balanced or the training class
frequencies); a text-to-image model cycles the caption contexts of ``eval.captions`` (U-ViT: val2014) or of its
training set. Every process draws its share (sample i depends only on (seed, i), so the score does not depend on the
number of processes), features are reduced to running statistics on every process, and the Frechet distance is taken
against the reference statistics of ``eval.reference`` or of the training images (computed once and cached in
``WORKDIR/eval``). ``eval.feature_extractor=dinov2`` makes the score EDM2's FD-DINOv2 instead (DINOv2 ViT-L/14,
see fd_dinov2.py). ``eval.protocol`` decides the Inception's front end and, for an ADM reference batch, whether its
stored statistics (adm) or those of its images (pytorch_fid) are the reference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion.evaluation.digits import digits_classifier_accuracy
from diffusion.evaluation.extractors import build_feature_extractor
from diffusion.evaluation.features import broadcast_from_main, generated_statistics, rank_and_world
from diffusion.evaluation.metrics import frechet_distance
from diffusion.evaluation.reference import reference_statistics_for_config
from diffusion.files import write_atomic
from diffusion.registry import describe
from diffusion.sampling.generate import SampleSource, generate
from diffusion.sampling.grids import class_rows
from diffusion.sampling.loader import load_guide
from diffusion.sampling.per_sample import LabelPlan
from diffusion.sampling.settings import overlay

HISTORY = "fid.json"


SELECTION_KEYS = ("sampler", "steps", "guidance_scale")  # eval.<key> overrides sample.<key> while selecting


def selection_sample_config(config):
    """``config.sample`` with the set values of ``eval.sampler`` / ``eval.steps`` / ``eval.guidance_scale``
    ("" / 0 / None: unset) on top: the sampler of the in-training scores that select the checkpoint. Another sampler
    than ``sample.sampler`` takes its own option defaults (``diffusion.sampling.settings.overlay``: U-ViT's CIFAR-10
    Euler-Maruyama ends at 1e-3, its DPM-Solver selection at its own 1e-4)."""
    return overlay(config.sample, {key: config.eval.get(key) for key in SELECTION_KEYS})


def fid_name(n_samples: int) -> str:
    """The metric's name by sample count: fid10k, fid50k, fid500."""
    return f"fid{n_samples // 1000}k" if n_samples % 1000 == 0 else f"fid{n_samples}"


@dataclass
class FidHistory:
    """Every in-training score and the best one, kept in ``WORKDIR/fid.json`` across resumes."""

    path: Path
    scores: dict[int, float] = field(default_factory=dict)  # step -> FID
    final: dict = field(default_factory=dict)  # the best checkpoint scored with eval.final_n_samples

    @classmethod
    def load(cls, workdir: Path) -> FidHistory:
        path = workdir / HISTORY
        if not path.is_file():
            return cls(path)
        saved = json.loads(path.read_text())
        return cls(path, {int(s): float(v) for s, v in saved["scores"].items()}, saved.get("final", {}))

    @property
    def best_step(self) -> int | None:
        return min(self.scores, key=self.scores.get) if self.scores else None

    def add(self, step: int, fid: float) -> None:
        """Every process keeps the same history (the score is broadcast), so all agree on the best step."""
        self.scores[step] = fid

    def write(self) -> None:
        best = self.best_step
        record = {"scores": {str(s): v for s, v in sorted(self.scores.items())}, "best_step": best,
                  "best_fid": self.scores.get(best), "final": self.final}
        write_atomic(self.path, lambda f: f.write(json.dumps(record, indent=2).encode()))


class TrainingFID:
    """Scores a model: ``fid(model, n_samples) -> float`` on every process (all must call it).

    What it needs of the training data comes as plain values: ``shape`` (C, H, W) of the model's samples, ``decode``
    (latents -> images) for latent models, ``class_counts`` for ``sample.labels=train_freq``, and for text-to-image
    models ``captions`` (``captions[indices]`` -> contexts, cycled over the samples by index: the training set's or
    ``eval.captions``', see ``diffusion.training.data.fid_captions``) and ``null_context``. ``info``: the scored
    model's contract (``registry.describe``), which ``sample.guide``'s network, loaded here once, must match."""

    def __init__(self, config, workdir: Path, *, state, device, objective, shape: tuple[int, ...],
                 decode: Callable | None = None, class_counts: list[int] | None = None,
                 captions=None,
                 null_context: torch.Tensor | None = None, info=None):
        ev = config.eval
        self.config, self.state, self.device, self.objective = config, state, device, objective
        self.shape, self.decode, self.class_counts = shape, decode, class_counts
        self.captions, self.null_context = captions, null_context
        self.selection = selection_sample_config(config)
        self.guide, self.guide_source = None, None
        if config.sample.get("guide"):
            if info is None:
                raise ValueError("sample.guide: TrainingFID needs the model's contract (info) to check the guide")
            self.guide, self.guide_source = load_guide(config, shape, info, device=device)
        # eval.feature_extractor=dinov2: the score is EDM2's FD-DINOv2 (weights: eval.dinov2_weights, else the caches)
        weights = ev.get("dinov2_weights", "") if ev.feature_extractor == "dinov2" else ev.inception_weights
        self.extractor = build_feature_extractor(ev.feature_extractor, weights=weights, device=device,
                                                 protocol=ev.get("protocol", "pytorch_fid"))
        self.reference = reference_statistics_for_config(config, self.extractor, workdir / "eval", state=state,
                                                         batch_size=ev.batch_size)

    def _source(self, model, final: bool) -> SampleSource:
        sample_cfg = self.config.sample if final else self.selection
        seed = self.config.eval.seed
        labels, classes = None, describe(model).num_labels
        if self.captions is None and classes:
            counts = self.class_counts if sample_cfg.labels == "train_freq" else None
            labels = LabelPlan(sample_cfg.labels, classes, seed=seed, class_counts=counts)
        # text-to-image: sample i on caption i (cycled)
        return SampleSource(model, self.objective, sample_cfg, self.shape, seed=seed, labels=labels,
                            contexts=self.captions, null_context=self.null_context, decode=self.decode,
                            device=self.device, guide=self.guide)

    @property
    def guide_note(self) -> str:
        """`` by the guide NAME`` for log lines when autoguided, else ""."""
        return f" by the guide {self.guide_source.name}" if self.guide is not None else ""

    def __call__(self, model, n_samples: int, progress: bool = False, final: bool = False) -> float:
        """FID of ``n_samples`` samples of ``model``: with the selection sampler (``self.selection``), or with
        ``final`` the ``sample`` section's (the best checkpoint's reported score)."""
        source = self._source(model, final)
        stats = generated_statistics(lambda indices: source.uint8(indices)[0], n_samples, self.extractor,
                                     batch_size=self.config.eval.batch_size, state=self.state, progress=progress)
        fid = None
        if rank_and_world(self.state)[0] == 0:  # the 2048-d matrix square root is costly: once
            fid = frechet_distance(stats["mu"], stats["sigma"], self.reference["mu"], self.reference["sigma"])
        return broadcast_from_main(fid, self.state)


def end_of_run_metrics(config, ema, objective, image_shape, device) -> dict:
    """The end-of-run check named by ``config.eval.metric`` (empty: none)."""
    metric = config.eval.metric
    if not metric:
        return {}
    if metric == "digits_accuracy":
        labels = class_rows(describe(ema).num_labels, config.eval.per_class)
        samples = generate(ema, objective, config.sample, image_shape, labels=labels, seed=config.eval.seed,
                           device=device)
        return {"digits_accuracy": digits_classifier_accuracy(samples.cpu(), labels)}
    raise AssertionError(f"eval.metric {metric!r} passed validation but has no implementation")
