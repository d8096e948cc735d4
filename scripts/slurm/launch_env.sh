# shellcheck shell=bash
# The launch of train.py across the nodes of a SLURM job, as functions of SLURM's variables (sourced by train.sbatch
# and node.sh; docs/multinode.md). Every outside command is a variable so that tests can put fakes in its place:
# SCONTROL, SCANCEL, SRUN (default: the SLURM commands on PATH) and PYTHON (default: python).
#
#   slurm_master_addr      the first node of SLURM_JOB_NODELIST: rank 0's host, where the rendezvous listens
#   slurm_master_port      MASTER_PORT, else a port derived from SLURM_JOB_ID (every node derives the same one)
#   slurm_nproc_per_node   NPROC_PER_NODE, else the GPUs SLURM gave each node (else its tasks per node, else 1)
#   slurm_torchrun_args    this node's torchrun flags (run inside the srun task: SLURM_NODEID is the node's)
#   slurm_train ARGS...    the batch script's work: srun one torchrun per node, forward the warning signal,
#                          requeue the job once the run has saved and stopped

slurm_say() { echo "[slurm] $*" >&2; }

slurm_die() {
    slurm_say "$*"
    exit 2
}

# slurm_require VAR...: each must be set (SLURM sets them in a job).
slurm_require() {
    local name
    for name in "$@"; do
        [ -n "${!name:-}" ] || slurm_die "$name is not set: run this inside a SLURM job (sbatch), or set it"
    done
}

slurm_master_addr() {
    if [ -n "${MASTER_ADDR:-}" ]; then
        echo "$MASTER_ADDR"
        return
    fi
    slurm_require SLURM_JOB_NODELIST
    local first
    first=$(${SCONTROL:-scontrol} show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [ -n "$first" ] || slurm_die "'scontrol show hostnames $SLURM_JOB_NODELIST' printed no host name"
    echo "$first"
}

# A requeued job keeps its id, and its earlier processes are gone by then, so the same port is free again. The range
# 15000-29999 stays below Linux's ephemeral ports (32768 and up), which outgoing connections take.
slurm_master_port() {
    if [ -n "${MASTER_PORT:-}" ]; then
        echo "$MASTER_PORT"
        return
    fi
    slurm_require SLURM_JOB_ID
    echo $((15000 + SLURM_JOB_ID % 15000))
}

# SLURM_GPUS_ON_NODE is set where GPUs are allocated as GRES; --gpus-per-node sets SLURM_GPUS_PER_NODE, possibly
# as TYPE:COUNT; without GPUs, --ntasks-per-node of the allocation (one task per GPU, the layout without torchrun).
# Read in the batch shell: inside the srun step (one task per node) SLURM_NTASKS_PER_NODE is the step's 1.
slurm_nproc_per_node() {
    local n=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}}
    n=${n##*:}
    [[ $n =~ ^[1-9][0-9]*$ ]] || slurm_die "cannot tell the processes per node from '$n': set NPROC_PER_NODE"
    echo "$n"
}

# Static rendezvous: node SLURM_NODEID's processes are ranks SLURM_NODEID * nproc ... (SLURM_NODEID + 1) * nproc - 1,
# so rank 0 (the one that holds the workdir lock and writes checkpoints) runs on the first node, where MASTER_ADDR
# points. LOCAL_RANK (the GPU index on a node) is set by torchrun for each of a node's processes.
slurm_torchrun_args() {
    slurm_require SLURM_NNODES SLURM_NODEID
    local addr port nproc
    addr=$(slurm_master_addr) || exit
    port=$(slurm_master_port) || exit
    nproc=$(slurm_nproc_per_node) || exit
    echo "--nnodes=$SLURM_NNODES --node_rank=$SLURM_NODEID --nproc_per_node=$nproc --master_addr=$addr" \
        "--master_port=$port --max_restarts=0"
}

# The warning (sbatch --signal=B:USR1@SECONDS) or a SIGTERM reaches this batch shell only; SIGTERM goes on to every
# process of the job's steps (scancel without --batch leaves this shell out): torchrun passes it to its processes,
# which save a checkpoint at the end of the current step and exit 3. Only the first signal is passed on: a second
# SIGTERM reaching train.py 2 s or more after the first would end it without saving.
slurm_forward() {
    if [ -n "$SLURM_STOP_SIGNAL" ]; then
        slurm_say "SIG$1 again: the processes were asked to stop already (on SIG$SLURM_STOP_SIGNAL)"
        return
    fi
    SLURM_STOP_SIGNAL=$1
    slurm_say "SIG$1: asking every training process to save a checkpoint and stop" \
        "(SIGTERM to job $SLURM_JOB_ID's steps)"
    ${SCANCEL:-scancel} --signal=TERM "$SLURM_JOB_ID" || slurm_say "warning: scancel --signal=TERM $SLURM_JOB_ID failed"
}

slurm_train() {
    slurm_require SLURM_JOB_ID SLURM_NNODES SLURM_JOB_NODELIST
    MASTER_ADDR=$(slurm_master_addr) || exit
    MASTER_PORT=$(slurm_master_port) || exit
    export MASTER_ADDR MASTER_PORT
    # torchrun waits this long for its processes to exit after passing on a signal, then kills them: most of the
    # warning time, for the checkpoint to be written (torch versions with torchrun --shutdown-timeout read it; older
    # ones wait 30 s).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
    NPROC_PER_NODE=$(slurm_nproc_per_node) || exit
    export NPROC_PER_NODE  # what every node's torchrun starts
    slurm_say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $NPROC_PER_NODE" \
        "process(es), rendezvous $MASTER_ADDR:$MASTER_PORT; resumes from the newest checkpoint in the workdir"

    SLURM_STOP_SIGNAL=""
    trap 'slurm_forward USR1' USR1
    trap 'slurm_forward TERM' TERM
    # One task per node whatever the allocation's tasks per node: torchrun starts the node's processes itself.
    local cpus=()
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpus=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    # ${cpus[@]+...}: an empty array under set -u is an error before bash 4.4
    ${SRUN:-srun} --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 ${cpus[@]+"${cpus[@]}"} \
        --kill-on-bad-exit=1 bash scripts/slurm/node.sh "$@" &
    local pid=$! status
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid"  # returns early when a trapped signal arrives: the handler runs, then wait again
    done
    wait "$pid"
    status=$?
    if [ -n "$SLURM_STOP_SIGNAL" ] && [ "$status" -ne 0 ]; then
        slurm_say "stopped on SIG$SLURM_STOP_SIGNAL (srun exit $status): requeueing job $SLURM_JOB_ID, which resumes" \
            "from the checkpoint just saved"
        ${SCONTROL:-scontrol} requeue "$SLURM_JOB_ID" || slurm_die "scontrol requeue $SLURM_JOB_ID failed: submit" \
            "the same command again to resume"
        exit 0
    fi
    exit "$status"
}
