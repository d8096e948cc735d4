"""FID (and sFID, Inception Score, precision/recall, FD-DINOv2) of samples against a reference; statistics files.

    python eval_fid.py samples.npz fid_stats_imagenet256_guided_diffusion.npz            # FID (U-ViT's stats)
    python eval_fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --metrics fid,sfid,is,pr   # DiT's (protocol adm)
    python eval_fid.py samples/ configs/cifar10_uvit_s2.py --config.data.root=data     # reference: CIFAR-10 train
    accelerate launch --num_processes=8 eval_fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --metrics fid,pr
    python eval_fid.py --save_stats fid_stats_cifar10_train.npz configs/cifar10_uvit_s2.py --config.data.root=data
    python eval_fid.py --save_stats fid_stats_imagenet64_train.npz imagenet/train --resolution 64   # ADM crop
    python eval_fid.py --save_stats fid_stats_mscoco256_val.npz coco/ --coco val                    # U-ViT's COCO
    python eval_fid.py samples.npz configs/digits_uvit.py --extractor digits             # quickstart (digits)
    python eval_fid.py samples.npz imagenet512_ref/ --metrics fid,fd_dinov2 --dinov2 dinov2_vitl14_pretrain.pth
    python eval_fid.py --save_stats dinov2_stats.npz imagenet/train --resolution 512 --extractor dinov2

SAMPLES: an .npz (arr_0 uint8 (N, H, W, 3), as sample.py writes) or an image folder. REFERENCE: a statistics file
(mu, sigma[, mu_s, sigma_s]), an ADM reference batch (arr_0 + statistics), an image folder (--resolution R: ADM's
centre crop), a dataset config (its training images as the dataset prepares them, flips off; --config.key=value
overrides) or an MS-COCO 2014 root (--coco SPLIT). Metrics: fid, sfid (spatial features, needs them on both sides),
is (Inception Score), pr (precision/recall, k = 3; needs reference images, not a statistics file), fd_dinov2
(EDM2's FD-DINOv2: the Frechet distance of DINOv2 ViT-L/14 class tokens; against images, or a statistics file made
with --save_stats --extractor dinov2; an ADM batch's stored statistics are Inception ones, so never used for it).

--protocol (default: a config REFERENCE's eval.protocol; adm for an ADM reference batch, an .npz holding mu, sigma,
mu_s and sigma_s beside arr_0, said in the first line of output; else pytorch_fid) says how they are measured:
  pytorch_fid  pytorch-fid's Inception front end (uint8 / 255, bilinear resize with half-pixel centres, 2x - 1); an
               ADM batch's statistics recomputed from its images (its stored ones with --adm_stats); IS over 10 equal
               splits; precision/recall distances in float32. U-ViT's numbers.
  adm          ADM's evaluator (evaluations/evaluator.py): its front end (TF1 resize to 299 without half-pixel
               centres on [0, 255], then (x - 128) / 128) into the same Inception weights; an ADM batch's stored
               statistics for FID/sFID and its images for precision/recall; IS in splits of 5,000; precision/recall
               distances in float16 (float32 where not finite). DiT's, SiT's and REPA's numbers.

Features come from pytorch-fid's FID Inception (pt_inception-2015-12-05-6726825d.pth, read from pytorch-fid's
torch-hub cache or --inception PATH; never downloaded here), or from the digits classifier (--extractor digits),
or, for fd_dinov2 and --extractor dinov2, DINOv2 ViT-L/14 (--dinov2 PATH: torch.hub's dinov2_vitl14_pretrain.pth, a
timm file or a transformers folder; default: a config's eval.dinov2_weights, else the torch-hub/Hugging Face caches;
never downloaded) with EDM2's preprocessing (bicubic antialiased resize to 224, / 255, ImageNet mean/std).
A config REFERENCE's eval.feature_extractor, eval.inception_weights and eval.protocol are the defaults. Features are
cached beside each .npz / folder (NAME.features-<extractor>.npz; the Inception's id ends in -adm under ADM's front
end) or in --cache_dir and reused until the file or folder changes.
Under `accelerate launch` every process extracts a share.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState

from diffusion.config.cli import Arguments, Command, Flag, run_main
from diffusion.config.loading import load_config
from diffusion.errors import ConfigError, InputError, user_files
from diffusion.evaluation import (
    EXTRACTORS,
    PROTOCOL_NAMES,
    FeatureExtractor,
    Protocol,
    build_feature_extractor,
    cached_features,
    frechet_distance,
    get_protocol,
    load_reference,
    open_images,
    save_statistics,
)
from diffusion.evaluation.features import accumulate_statistics, statistics_of_features
from diffusion.evaluation.reference import npz_arrays

METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
NEEDS = {"sfid": "spatial", "is": "logits"}  # metric -> extractor output it needs besides pool
STATISTICS_OF = {"fid": "pool", "sfid": "spatial", "fd_dinov2": "pool"}  # metric -> features it compares
OWN_EXTRACTOR = {"fd_dinov2": "dinov2"}  # metrics measured with their own extractor, not --extractor's
ADM_BATCH = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")  # what ADM's reference batches (VIRTUAL_*.npz) hold
COMMAND = Command(__doc__, config="none", positional="PATH ...",
                  positional_help="SAMPLES REFERENCE, or SOURCE with --save_stats", flags=(
    Flag("save_stats", metavar="OUT.npz", help="write the statistics (mu, sigma[, mu_s, sigma_s]) of SOURCE to "
         "OUT.npz"),
    Flag("metrics", "fid", help=f"comma-separated, of {','.join(METRICS)} (default: fid)"),
    Flag("json", metavar="PATH", help="also write the scores to this JSON file"),
    Flag("extractor", choices=EXTRACTORS, help="default: a config's eval.feature_extractor, else inception"),
    Flag("inception", "", metavar="PATH",
         help="FID Inception weights (default: a config's eval.inception_weights, else pytorch-fid's cache)"),
    Flag("dinov2", "", metavar="PATH", help="DINOv2 ViT-L/14 weights for fd_dinov2 / --extractor dinov2 (a .pth, "
         "timm file or transformers folder; default: a config's eval.dinov2_weights, else the local caches)"),
    Flag("resolution", type=int, help="ADM centre crop of an image-folder reference/source (ImageNet); MS-COCO's "
         "size (default 256)"),
    Flag("coco", choices=("train", "val"),
         help="the reference/source is an MS-COCO 2014 root: its captioned images of that split (U-ViT: val)"),
    Flag("protocol", choices=PROTOCOL_NAMES, help="how to measure: pytorch_fid (U-ViT's) or adm (ADM's evaluator: "
         "DiT's, SiT's); default: a config's eval.protocol, adm for an ADM reference batch, else pytorch_fid"),
    Flag("adm_stats", False, bool,
         help="use an ADM reference batch's stored statistics (from ADM's TensorFlow evaluator); --protocol adm "
         "uses them whenever the batch has them"),
    Flag("batch_size", 250, int, help="images per network batch and process"),
    Flag("num_workers", 4, int, help="image-decoding workers (folders, datasets)"),
    Flag("cache_dir", metavar="DIR", help="where feature caches go (default: beside the .npz/folder when writable, "
         "else ~/.cache/transformer-diffusion/eval)"),
    Flag("no_cache", False, bool, help="neither read nor write feature caches"),
    Flag("device", help="default: the process's GPU, else cpu"),
))


def cached_reference(reference) -> str:
    if not reference.cached:
        return ""
    return ", cached features" if reference.features is not None else ", cached statistics"


def make_extractor(args: Arguments, config_spec: str, device, name: str = "") -> tuple[FeatureExtractor, Protocol]:
    """(the extractor, the protocol) the flags ask for (``name``: this extractor instead of --extractor's); a
    dataset config's ``eval`` section supplies the defaults."""
    name, inception, dinov2, protocol = name or args.extractor, args.inception, args.dinov2, args.protocol
    if config_spec.endswith(".py"):
        config = load_config(config_spec, args.overrides)
        name = name or config.eval.feature_extractor
        inception = inception or config.eval.inception_weights
        dinov2 = dinov2 or config.eval.get("dinov2_weights", "")
        protocol = protocol or config.eval.get("protocol", "")
    protocol, name = get_protocol(protocol or "pytorch_fid"), name or "inception"
    weights = dinov2 if name == "dinov2" else inception
    extractor = build_feature_extractor(name, weights=weights, device=device, protocol=protocol.name)
    return extractor, protocol


def save_stats(args: Arguments, state, device) -> str:
    if len(args.positional) != 1:
        raise ConfigError(f"--save_stats takes one SOURCE (a config, image folder, .npz or --coco root), got "
                          f"{len(args.positional)} paths")
    if not args.save_stats.endswith(".npz"):
        raise ConfigError(f"--save_stats writes an .npz file, got {args.save_stats}")
    source = open_images(args.positional[0], resolution=args.resolution, coco_split=args.coco,
                         overrides=args.overrides)
    extractor, protocol = make_extractor(args, args.positional[0], device)
    stats = accumulate_statistics(source, extractor, batch_size=args.batch_size, num_workers=args.num_workers,
                                  state=state)
    if not state.is_main_process:
        return ""
    path = save_statistics(args.save_stats, stats)
    spatial = " + mu_s/sigma_s" if "mu_s" in stats else ""
    return (f"wrote {path}: mu/sigma ({len(stats['mu'])}-d){spatial} of {len(source)} images of {source.description}, "
            f"{extractor.id}, protocol {protocol.name}")


def compute_metrics(metrics: list[str], samples: dict, reference, device, protocol: Protocol) -> dict:
    scores = {}
    sample_stats = statistics_of_features(samples, tuple(STATISTICS_OF[m] for m in metrics if m in STATISTICS_OF))
    if "fid" in metrics:
        scores["fid"] = frechet_distance(sample_stats["mu"], sample_stats["sigma"], reference.statistics["mu"],
                                         reference.statistics["sigma"])
    if "sfid" in metrics:
        if "mu_s" not in reference.statistics:
            raise InputError(f"sFID needs spatial statistics (mu_s, sigma_s); the reference {reference.description} "
                             f"has none")
        scores["sfid"] = frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], reference.statistics["mu_s"],
                                          reference.statistics["sigma_s"])
    if "is" in metrics:
        scores["inception_score"], scores["inception_score_std"] = protocol.inception_score(samples["logits"])
    if "pr" in metrics:
        scores["precision"], scores["recall"] = protocol.precision_recall(reference.features["pool"], samples["pool"],
                                                                          device=device)
    if "fd_dinov2" in metrics:
        scores["fd_dinov2"] = frechet_distance(sample_stats["mu"], sample_stats["sigma"], reference.statistics["mu"],
                                               reference.statistics["sigma"])
    return scores


def summary_line(scores: dict) -> str:
    parts = [f"{name} {scores[key]:.4f}" for key, name in (("fid", "FID"), ("sfid", "sFID"), ("fd_dinov2", "FD-DINOv2"))
             if key in scores]
    if "inception_score" in scores:
        parts.append(f"IS {scores['inception_score']:.3f} ± {scores['inception_score_std']:.3f}")
    if "precision" in scores:
        parts.append(f"precision {scores['precision']:.4f} recall {scores['recall']:.4f}")
    return "  ".join(parts)


def stored_statistics(args: Arguments, protocol: Protocol) -> str:
    """Whether an ADM batch's stored statistics are the FID/sFID reference: --adm_stats insists, adm uses them."""
    return "required" if args.adm_stats else "if_stored" if protocol.stored_statistics else "never"


def adm_batch_protocol(args: Arguments, reference_spec: str) -> str:
    """With no --protocol and an ADM reference batch as REFERENCE: set the protocol to adm (the evaluator whose
    numbers such a batch stands behind) and return the line that says so; else change nothing and return ""."""
    path = Path(reference_spec)
    if args.protocol or args.coco or path.suffix != ".npz" or not path.is_file():
        return ""  # a config REFERENCE's eval.protocol applies in make_extractor
    if not set(ADM_BATCH) <= set(npz_arrays(path)):
        return ""
    args.values["protocol"] = "adm"
    return (f"protocol adm (ADM's evaluator, as DiT, SiT and REPA score): {path.name} is an ADM reference batch "
            f"(mu, sigma, mu_s, sigma_s beside arr_0) and no --protocol was given; --protocol pytorch_fid scores "
            f"with pytorch-fid's front end")


def metric_groups(args: Arguments, metrics: list[str], reference_spec: str, device
                  ) -> tuple[list[tuple[FeatureExtractor, list[str]]], Protocol]:
    """The extractors the metrics need, each with its metrics (fd_dinov2: DINOv2; the rest: --extractor's), all
    built (and their weights found) before any image is read; and the protocol."""
    main = [m for m in metrics if m not in OWN_EXTRACTOR]
    protocol, groups = get_protocol(args.protocol or "pytorch_fid"), {}
    if main:
        extractor, protocol = make_extractor(args, reference_spec, device)
        groups[extractor.id] = (extractor, main)
    for metric in (m for m in metrics if m in OWN_EXTRACTOR):
        own, protocol = make_extractor(args, reference_spec, device, name=OWN_EXTRACTOR[metric])
        groups.setdefault(own.id, (own, []))[1].append(metric)
    for extractor, names in groups.values():
        missing = [m for m in names if NEEDS.get(m, "pool") not in extractor.dims]
        if missing:
            raise ConfigError(f"the {extractor.id} extractor has no {NEEDS[missing[0]]} features, needed by "
                              f"{missing[0]}")
    return list(groups.values()), protocol


def evaluate(args: Arguments, state, device) -> str:
    if len(args.positional) != 2:
        raise ConfigError(f"give SAMPLES and REFERENCE (or --save_stats OUT.npz SOURCE), got {len(args.positional)} "
                          f"paths")
    samples_spec, reference_spec = args.positional
    if samples_spec.endswith(".py"):
        raise ConfigError("SAMPLES must be an .npz or an image folder; a dataset config can only be the REFERENCE")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"unknown metrics {unknown or args.metrics!r}; choose from {', '.join(METRICS)}")
    note = adm_batch_protocol(args, reference_spec)
    if note and state.is_main_process:
        print(note, flush=True)  # the first line, before the extraction: the protocol decides the score
    groups, protocol = metric_groups(args, metrics, reference_spec, device)
    samples = open_images(samples_spec)  # a missing or malformed samples file fails before any extraction
    common = dict(cache_dir=args.cache_dir, use_cache=not args.no_cache, batch_size=args.batch_size,
                  num_workers=args.num_workers, state=state)
    scores, lines, record = {}, [], {}
    for extractor, names in groups:
        own = any(m in OWN_EXTRACTOR for m in names)  # an ADM batch's stored statistics are the Inception's
        reference = load_reference(reference_spec, extractor, need_features="pr" in names,
                                   statistics_of=tuple(dict.fromkeys(STATISTICS_OF[m] for m in names
                                                                     if m in STATISTICS_OF)),
                                   stored_statistics="never" if own else stored_statistics(args, protocol),
                                   resolution=args.resolution, coco_split=args.coco, overrides=args.overrides,
                                   **common)
        features, cached = cached_features(samples, extractor, **common)
        if not state.is_main_process:
            continue
        group_scores = compute_metrics(names, features, reference, device, protocol)
        scores.update(group_scores)
        record.setdefault("reference", reference.record())
        record["extractor" if not own or len(groups) == 1 else "fd_dinov2_extractor"] = extractor.id
        ref_count = f"{reference.num_images} images, " if reference.num_images else ""
        lines.append(f"{summary_line(group_scores)}\n  {len(samples)} samples of {samples.description}"
                     f"{' (cached features)' if cached else ''} vs {reference.description} ({ref_count}statistics "
                     f"from {reference.statistics_from}{cached_reference(reference)}); {extractor.id}, protocol "
                     f"{protocol.name}")
    if not state.is_main_process:
        return ""
    if args.json:
        record = {**scores, "num_samples": len(samples), "samples": str(Path(samples_spec).resolve()), **record,
                  "protocol": protocol.name, "metrics": metrics}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return "\n".join(lines)


def run(args: Arguments) -> int:
    start = time.perf_counter()
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    device = torch.device(args.device) if args.device else state.device
    with user_files():
        summary = (save_stats if args.save_stats else evaluate)(args, state, device)
    if summary:
        print(f"{summary} [{time.perf_counter() - start:.1f} s]")
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
