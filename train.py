"""Train a U-ViT or DiT from a config file.

    accelerate launch train.py --config=configs/cifar10_uvit_s2.py [--config.train.steps=1000] [--workdir=DIR]
    python train.py --config=configs/digits_uvit.py

Re-running the same command resumes from the newest checkpoint in the workdir (default: runs/<config name>).
"""

import sys
from pathlib import Path

from diffusion.config import ConfigError, parse_command_line
from diffusion.data import DatasetNotFoundError


def main(argv: list[str]) -> int:
    try:
        config, flags = parse_command_line(argv, {"workdir": None})
        workdir = flags["workdir"] or str(Path("runs") / Path(flags["config_path"]).stem)
        from diffusion.trainer import train

        train(config, workdir)
    except (ConfigError, DatasetNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
