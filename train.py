"""Train a U-ViT or DiT from a config file.

    accelerate launch train.py --config=configs/cifar10_uvit_s2.py [--config.train.steps=1000] [--workdir=DIR]
    python train.py --config=configs/digits_uvit.py

Re-running the same command resumes from the newest intact checkpoint in the workdir (default: runs/<config name>).

Stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 saves a checkpoint at the end of the current step and exits 3;
the same signal again (after 2 s) exits at once without saving.

Exit status: 0 finished; 2 bad input or refused (config, data, checkpoint, busy workdir, failed save, NaN loss:
the message says what to fix; nothing is trained on it); 3 stopped by a signal after saving a checkpoint (rerun
the same command to resume); 128 + N a repeated signal N ended the run without saving.
"""

import sys
from pathlib import Path

from diffusion.config.cli import Arguments, Command, Flag, run_main
from diffusion.training.loop import train
from diffusion.training.stopping import StoppedBySignal

EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130  # Ctrl-C before training started
COMMAND = Command(__doc__, flags=(
    Flag("workdir", metavar="DIR", help="checkpoints, log.txt, samples/ (default runs/<config name>); one run at a "
         "time"),
    Flag("allow_config_change", False, bool, help="resume although the config changes the run (batch size, model, "
         "data, ...)"),
))


def run(args: Arguments) -> int:
    config = args.load_config()
    workdir = args.workdir or str(Path("runs") / Path(args.config_path).stem)
    try:
        train(config, workdir, allow_config_change=args.allow_config_change)
    except StoppedBySignal as stopped:
        if stopped.checkpoint is not None:
            print(f"[train] stopped by {stopped.signal_name} at step {stopped.step}: checkpoint saved in "
                  f"{stopped.checkpoint}; rerun the same command to resume", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # nothing to save yet
        print("[train] interrupted before training started; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def main(argv: list[str]) -> int:
    return run_main(COMMAND, argv, run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
