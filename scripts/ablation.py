"""U-ViT's design-space ablation (Bao et al., CVPR 2023, Sec. 3.1 and Fig. 2), one named variant per command.

    python scripts/ablation.py --list
    python scripts/ablation.py VARIANT [--num_processes N] [--workdir DIR] [--dry_run] [--config.key=value ...]
    python scripts/ablation.py VARIANT --recipe configs/cifar10_uvit_s2_fm.py    # the same study under flow matching

Every variant is the CIFAR-10 U-ViT-S/2 recipe (configs/cifar10_uvit_s2.py) scored as in the paper's Fig. 2, FID on
10K EMA samples every 50K steps, plus the variant's switches of the U-ViT constructor (``uvit/model.py``). It runs
``--recipe`` names another U-ViT config to vary (``configs/cifar10_uvit_s2_fm.py``: the same backbone trained
with SiT's linear-path velocity objective), everything else as above. It runs
``python train.py`` (one process) or ``accelerate launch --multi_gpu`` (N > 1) from the repository root, in
``runs/ablation/<variant>`` unless ``--workdir`` says otherwise; re-running the same command resumes. Extra
``--config.key=value`` flags come last and win over the variant's. ``--dry_run`` prints the command instead.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a file: the package is importable from any working directory

from diffusion.config.cli import Arguments, Command, Flag, run_main  # noqa: E402
from diffusion.config.loading import load_config  # noqa: E402
from diffusion.errors import ConfigError  # noqa: E402

RECIPE = "configs/cifar10_uvit_s2.py"
PAPER_EVAL = {"eval.every": "50000", "eval.n_samples": "10000"}  # Fig. 2: FID-10K every 50K training steps


@dataclass(frozen=True)
class Variant:
    panel: str  # which design choice of Fig. 2 it belongs to
    design: str
    finding: str  # the paper's conclusion about this choice (no numbers: read them off Fig. 2)
    model: dict[str, str] = field(default_factory=dict)  # U-ViT constructor keyword -> override value


_SKIP = "Fig. 2(a) long skip"
_SKIP_FINDING = ("concat + linear (the adopted) performs best; h_m + h_s gives no benefit over no long skip, since "
                 "each block's residual additions already hold h_s linearly; every way that linearly projects h_s "
                 "beats no long skip")
VARIANTS: dict[str, Variant] = {
    "baseline": Variant("Fig. 2, every panel", "the adopted U-ViT: Linear(concat(h_m, h_s)) long skip, time as a "
                        "token, 3x3 conv after the linear decoder, linear patch embedding, learned 1-D position "
                        "embedding", "best in every panel; each other variant changes one choice of it"),
    "skip_add": Variant(_SKIP, "h_m + h_s", _SKIP_FINDING, {"skip_mode": "add"}),
    "skip_add_linear_skip": Variant(_SKIP, "h_m + Linear(h_s)", _SKIP_FINDING, {"skip_mode": "add_linear_skip"}),
    "skip_linear_add": Variant(_SKIP, "Linear(h_m + h_s)", _SKIP_FINDING, {"skip_mode": "linear_add"}),
    "skip_none": Variant(_SKIP, "no long skip connection", _SKIP_FINDING, {"skip_mode": "none"}),
    "time_adaln": Variant("Fig. 2(b) time", "time through adaptive LayerNorm in every block (no time token)",
                          "time as a token performs better than adaLN, although it is simpler",
                          {"time_cond": "adaln"}),
    "conv_before": Variant("Fig. 2(c) extra conv", "3x3 conv on the (H/p, W/p, D) token grid before the linear "
                           "decoder", "the 3x3 conv after the linear decoder performs slightly better than before "
                           "it or none", {"conv_position": "before"}),
    "conv_none": Variant("Fig. 2(c) extra conv", "no extra convolution", "the 3x3 conv after the linear decoder "
                         "performs slightly better than before it or none", {"conv": "False"}),
    "patch_conv": Variant("Fig. 2(d) patch embedding", "3x3 stride-2 conv stem (BN, ReLU) then a 1x1 conv (Xiao "
                          "et al. 2021)", "the linear patch embedding performs better than the convolutional one",
                          {"patch_embed": "conv"}),
    "pos_sincos": Variant("Fig. 2(e) position embedding", "fixed 2-D sinusoidal position embedding (row, column)",
                          "the learned 1-D position embedding performs better than the 2-D sinusoidal one",
                          {"pos_embed": "sincos"}),
    "pos_none": Variant("Fig. 2(e) position embedding", "no position embedding", "without position embedding the "
                        "model fails to generate meaningful images: position information is critical",
                        {"pos_embed": "none"}),
}


def overrides(name: str) -> list[str]:
    """The config flags a variant adds to the recipe: the paper's evaluation, then its model switches."""
    settings = PAPER_EVAL | {f"model.{k}": v for k, v in VARIANTS[name].model.items()}
    return [f"--config.{k}={v}" for k, v in settings.items()]


def check_recipe(recipe: str) -> str:
    """The recipe's path relative to the repository root; refuses a file that is missing or not a U-ViT config (the
    variants are switches of the U-ViT constructor)."""
    path = Path(recipe)
    path = path if path.is_absolute() else REPO / path
    if not path.is_file():
        raise ConfigError(f"--recipe {recipe}: no such config file")
    name = load_config(str(path)).model.name
    if name != "uvit":
        raise ConfigError(f"--recipe {recipe} builds a {name!r} backbone; the variants switch U-ViT's design choices: "
                          f"give a U-ViT config")
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def build_command(name: str, num_processes: int = 1, workdir: str | None = None,
                  extra: tuple[str, ...] = (), recipe: str = RECIPE) -> list[str]:
    """The training command of variant ``name`` on ``recipe``, to run from the repository root."""
    launcher = [sys.executable]
    if num_processes > 1:
        launcher += ["-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={num_processes}",
                     "--num_machines=1", "--dynamo_backend=no"]
    workdir = workdir or f"runs/ablation/{name}"
    return [*launcher, "train.py", f"--config={recipe}", *overrides(name), *extra, f"--workdir={workdir}"]


def describe() -> str:
    lines = []
    for name, v in VARIANTS.items():
        lines += [name, f"  {v.panel}: {v.design}", f"  overrides: {' '.join(overrides(name))}",
                  f"  paper: {v.finding}"]
    return "\n".join(lines)


COMMAND = Command(__doc__, config="none", positional="VARIANT", positional_help="one of: " + ", ".join(VARIANTS),
                  flags=(
    Flag("list", False, bool, help="print every variant, its overrides and the finding"),
    Flag("num_processes", 1, int, help="> 1: accelerate launch on this many GPUs"),
    Flag("workdir", metavar="DIR", help="default: runs/ablation/<variant> under the repository root"),
    Flag("dry_run", False, bool, help="print the command, do not run it"),
    Flag("recipe", RECIPE, metavar="CONFIG", help="the U-ViT config the variants change (e.g. "
         "configs/cifar10_uvit_s2_fm.py: flow matching)"),
))


def run(args: Arguments) -> int:
    if args.list:
        print(describe())
        return 0
    variant = args.positional[0] if len(args.positional) == 1 else None
    if len(args.positional) > 1:
        raise ConfigError(f"one VARIANT at a time, got {' '.join(args.positional)}")
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)} (see --list)")
    if args.num_processes < 1:
        raise ConfigError("--num_processes must be >= 1")
    workdir = str(Path(args.workdir).resolve()) if args.workdir else None  # the command runs from the repo root
    extra = tuple(f"--config.{key}={value}" for key, value in args.overrides)  # after the variant's: they win
    cmd = build_command(variant, args.num_processes, workdir, extra, check_recipe(args.recipe))
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"[ablation] {variant}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.chdir(REPO)
    os.execv(cmd[0], cmd)  # the trainer takes over this process: signals and exit status are its own


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
