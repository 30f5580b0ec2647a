#!/usr/bin/env bash
# Train on GPUs: one node with all its GPUs, or several nodes under SLURM.
#
#   launch/gpu.sh --config configs/omni_negclip_vitb32.py --workdir runs/omni [-- --config.k=v]
#       One process sees every local GPU (restrict with CUDA_VISIBLE_DEVICES); the train
#       step is pmapped across them. config.batch_size must divide by the GPU count.
#   launch/gpu.sh --slurm --nodes 4 --gpus-per-node 8 --config ... --workdir /shared/runs/omni
#       srun starts one task per node, each running the same `python -m negclip_jax.train
#       ... --distributed`; jax.distributed.initialize() reads the SLURM environment
#       (coordinator = first node, process id = SLURM_PROCID) and JAX_LOCAL_DEVICE_IDS gives
#       each task all GPUs of its node. Run it inside an allocation (salloc/sbatch) or from
#       a login node (srun then allocates); --sbatch submits it as a batch job instead.
#       The workdir must be on a filesystem every node sees.
#
# Resume after a failure or preemption: re-run the same command; training continues from
# the latest checkpoint in the workdir. Set up once per machine / shared venv:
#   python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt "jax[cuda12]==0.10.2"
set -euo pipefail

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --config C            training config (default configs/omni_negclip_vitb32.py)
  --workdir W           run directory (required)
  --slurm               multi-node via srun (one task per node, --distributed)
  --sbatch              like --slurm, but submit with sbatch (log: <workdir>/slurm-%j.out)
  --nodes N             SLURM nodes (default 2)
  --gpus-per-node G     GPUs per node (default 8)
  --partition P         SLURM partition      --account A   SLURM account
  --time T              SLURM time limit (default 24:00:00)
  --dry-run             print the command instead of running it
  -h, --help            this message
Environment: PYTHON (default .venv/bin/python). Everything after -- goes to the trainer.
EOF
}

die() { echo "gpu.sh: $*" >&2; exit 2; }

PYTHON=${PYTHON:-.venv/bin/python}
config=configs/omni_negclip_vitb32.py workdir= mode=local nodes=2 gpus=8
partition= account= time_limit=24:00:00 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config|--workdir|--nodes|--gpus-per-node|--partition|--account|--time)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --config) config=$2 ;; --workdir) workdir=$2 ;; --nodes) nodes=$2 ;;
        --gpus-per-node) gpus=$2 ;; --partition) partition=$2 ;; --account) account=$2 ;;
        --time) time_limit=$2 ;;
      esac
      shift 2 ;;
    --slurm) mode=srun; shift ;;
    --sbatch) mode=sbatch; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (training flags go after --)" ;;
  esac
done
extra_args=("$@")
[[ -n $workdir ]] || { usage >&2; die "--workdir is required"; }
[[ $nodes =~ ^[1-9][0-9]*$ && $gpus =~ ^[1-9][0-9]*$ ]] || die "--nodes/--gpus-per-node: positive integers"

source "$(dirname "$0")/_common.sh"  # quote, quote_all, run

train=("$PYTHON" -m negclip_jax.train --config "$config" --workdir "$workdir")

if [[ $mode == local ]]; then
  run "${train[@]}" "${extra_args[@]}"
  exit
fi

# SLURM: every task gets all GPUs of its node (JAX would otherwise default to one GPU
# per task: local_device_ids = [SLURM_LOCALID]).
device_ids=$(seq -s, 0 $((gpus - 1)))
slurm=(--nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus" --time="$time_limit")
[[ -n $partition ]] && slurm+=(--partition="$partition")
[[ -n $account ]] && slurm+=(--account="$account")
step=(env JAX_LOCAL_DEVICE_IDS="$device_ids" srun "${slurm[@]}" --kill-on-bad-exit=1
      "${train[@]}" --distributed "${extra_args[@]}")
if [[ $mode == srun ]]; then
  run "${step[@]}"
else
  ((dry_run)) || mkdir -p "$workdir"
  run sbatch "${slurm[@]}" --job-name=negclip --output="$workdir/slurm-%j.out" \
      --wrap="$(quote_all "${step[@]}")"
fi
