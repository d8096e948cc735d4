"""Train a U-ViT or DiT from a config file.

    accelerate launch train.py --config=configs/cifar10_uvit_s2.py [--config.train.steps=1000] [--workdir=DIR]
    python train.py --config=configs/digits_uvit.py

Re-running the same command resumes from the newest intact checkpoint in the workdir (default: runs/<config name>).

Flags:
  --config=FILE                  the config file (a Python file with get_config())
  --config.<section>.<key>=VALUE override one config value; --help --config=FILE lists them all
  --workdir=DIR                  checkpoints, log.txt, samples/ (default runs/<config name>); one run at a time
  --allow_config_change          resume although the config changes the run (batch size, model, data, ...)
  --help                         this text (with --config: that config's keys and values)

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 saves a checkpoint at the end of the current step and exits 3;
the same signal again (after 2 s) exits at once without saving.

Exit status: 0 finished; 2 bad input or refused (config, data, checkpoint, busy workdir, failed save, NaN loss:
the message says what to fix; nothing is trained on it); 3 stopped by a signal after saving a checkpoint (rerun
the same command to resume); 128 + N a repeated signal N ended the run without saving.
"""

import sys
from pathlib import Path

from diffusion.config.cli import parse_command_line
from diffusion.config.loading import describe_config
from diffusion.errors import ConfigError

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
FLAGS = {"workdir": None, "allow_config_change": False}


def print_help(argv: list[str]) -> int:
    print(__doc__)
    try:
        config, flags = parse_command_line([a for a in argv if a not in ("-h", "--help")], FLAGS,
                                           require_config=False)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if config is None:
        print("Add --config=FILE to list that config's keys and values.")
    else:
        print(f"Keys of {flags['config_path']} with the overrides given (set any with --config.<key>=<value>):")
        print(describe_config(config))
    return 0


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        return print_help(argv)
    from diffusion.errors import (
        CheckpointError,
        CheckpointSaveError,
        DatasetNotFoundError,
        InceptionWeightsNotFoundError,
        UnreadableDataError,
        WeightsNotFoundError,  # SD VAE, CLIP
        WorkdirBusyError,
    )
    from diffusion.training.loop import train
    from diffusion.training.stopping import StoppedBySignal

    try:
        config, flags = parse_command_line(argv, FLAGS)
        workdir = flags["workdir"] or str(Path("runs") / Path(flags["config_path"]).stem)
        train(config, workdir, allow_config_change=flags["allow_config_change"])
    except StoppedBySignal as stopped:
        if stopped.checkpoint is not None:
            print(f"[train] stopped by {stopped.signal_name} at step {stopped.step}: checkpoint saved in "
                  f"{stopped.checkpoint}; rerun the same command to resume", file=sys.stderr)
        return EXIT_STOPPED
    except (ConfigError, DatasetNotFoundError, UnreadableDataError, CheckpointError, CheckpointSaveError,
            WorkdirBusyError, FloatingPointError, WeightsNotFoundError, InceptionWeightsNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save yet
        print("[train] interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
