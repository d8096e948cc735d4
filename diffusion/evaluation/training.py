"""FID during training: the EMA model sampled exactly as the config's evaluation sampler says.

U-ViT's recipe is FID on 10K samples every few checkpoints and FID-50K on the best one afterwards; both originals
logged *unguided* FID for guided models, which confused users, so here the samples are drawn with the config's
``sample`` section as it stands -- sampler, steps and guidance -- the settings behind the paper number. Labels
follow ``sample.labels`` (uniform, balanced or the training class frequencies); a text-to-image model cycles the
caption contexts of its training set. Every process draws its share (sample i depends only on (seed, i), so the
score does not depend on the number of processes), features are reduced to running statistics on every process,
and the Frechet distance is taken against the reference statistics of ``eval.reference`` or of the training
images (computed once and cached in ``WORKDIR/eval``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffusion.evaluation.extractors import build_feature_extractor
from diffusion.evaluation.features import broadcast_from_main, generated_statistics, rank_and_world
from diffusion.evaluation.metrics import frechet_distance
from diffusion.evaluation.reference import reference_statistics_for_config
from diffusion.files import write_atomic
from diffusion.sampling.generate import SampleSource, num_real_classes
from diffusion.sampling.per_sample import LabelPlan

HISTORY = "fid.json"
MAX_CONTEXTS = 1000  # caption contexts of a text model's training set cycled over the FID samples


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
    """Scores a model: ``fid(model, n_samples) -> float`` on every process (all must call it)."""

    def __init__(self, config, workdir: Path, *, state, device, data, objective):
        """``data``: the trainer's TrainData (shape, decode, null context, class counts, caption contexts)."""
        ev = config.eval
        self.config, self.state, self.device, self.data, self.objective = config, state, device, data, objective
        self.extractor = build_feature_extractor(ev.feature_extractor, weights=ev.inception_weights, device=device)
        self.reference = reference_statistics_for_config(config, self.extractor, workdir / "eval", state=state,
                                                         batch_size=ev.batch_size)

    def _source(self, model) -> SampleSource:
        sample_cfg = self.config.sample
        source = SampleSource(model, self.objective, sample_cfg, self.data.shape, seed=self.config.eval.seed,
                              decode=self.data.decode, device=self.device)
        if self.data.null_context is not None:  # text-to-image: the training captions' contexts, cycled
            source.contexts = self.data.caption_contexts(MAX_CONTEXTS, self.config.eval.seed)
            source.null_context = self.data.null_context
        elif num_real_classes(model):
            counts = self.data.class_counts if sample_cfg.labels == "train_freq" else None
            source.labels = LabelPlan(sample_cfg.labels, num_real_classes(model), seed=self.config.eval.seed,
                                      class_counts=counts)
        return source

    def __call__(self, model, n_samples: int, progress: bool = False) -> float:
        source = self._source(model)
        stats = generated_statistics(lambda indices: source.uint8(indices)[0], n_samples, self.extractor,
                                     batch_size=self.config.eval.batch_size, state=self.state, progress=progress)
        fid = None
        if rank_and_world(self.state)[0] == 0:  # the 2048-d matrix square root takes seconds: once
            fid = frechet_distance(stats["mu"], stats["sigma"], self.reference["mu"], self.reference["sigma"])
        return broadcast_from_main(fid, self.state)
