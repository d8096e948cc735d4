#!/bin/bash
# One node of a SLURM job (what train.sbatch's srun runs on every node): torchrun with this node's rank and
# processes and the first node's address and port, running ${TRAIN_SCRIPT:-train.py} with the given arguments.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/launch_env.sh"
args=$(slurm_torchrun_args)  # a failure ends the script here (set -e), with its message
read -ra launch <<<"$args"
# Signals torchrun passes on to its processes where it can be told (recent torch): a SIGUSR1 sent to every process
# of the job (sbatch --signal=USR1@T, without B:) would otherwise end torchrun itself.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
slurm_say "node $SLURM_NODEID: ${PYTHON:-python} -m torch.distributed.run ${launch[*]} ${TRAIN_SCRIPT:-train.py} $*"
exec ${PYTHON:-python} -m torch.distributed.run "${launch[@]}" "${TRAIN_SCRIPT:-train.py}" "$@"
