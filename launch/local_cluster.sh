#!/usr/bin/env bash
# A multi-process JAX "cluster" on this machine: N CPU processes x M fake devices each.
#
#   launch/local_cluster.sh --processes N --devices-per-process M [--port P] [options] \
#       -- --config configs/tiny.py --workdir DIR [--config.key=value ...]
#
# Starts N copies of
#   $PYTHON -m negclip_jax.train <train args> --coordinator_address 127.0.0.1:P \
#       --num_processes N --process_id i
# each with JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=M (gloo
# collectives between processes), so the multi-host code paths (host-sharded data,
# cross-process all_gather/pmean, collective checkpoint saves) run without a pod.
#
# Output: process 0 streams to this script's stdout/stderr (its last stdout line is the run's
# JSON summary); process i > 0 writes <log-dir>/process_i.log (default log dir:
# <workdir>/cluster_logs, or a new temporary directory without --workdir).
# Exit status: 0 if every process exits 0. As soon as one fails, the others are stopped
# (SIGTERM, then SIGKILL after --kill-grace seconds), the failing process's log tail is shown,
# and the script exits with that process's status. (Each survivor of a dead process also
# aborts on its own after train.py's --heartbeat_timeout, default 100 s; see --no-kill.)
# Ctrl-C / SIGTERM asks every process to save a checkpoint and stop. Re-running the same
# command resumes from the latest checkpoint in the workdir.
set -euo pipefail

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --processes N            number of processes (required)
  --devices-per-process M  fake CPU devices per process (required)
  --port P                 coordinator port on 127.0.0.1 (default: a free port)
  --log-dir DIR            where process_i.log go (default: <workdir>/cluster_logs)
  --stream-all             also stream processes i > 0 to stderr, prefixed "[process i] "
  --no-kill                on a failure, do not stop the other processes: wait for each to
                           exit on its own (tests that survivors detect a dead peer)
  --kill-grace S           after a failure: seconds between SIGTERM and SIGKILL for the
                           others (default 5; they cannot save without the failed peer)
  --term-grace S           on Ctrl-C / SIGTERM: seconds the processes get to save a
                           checkpoint and exit before SIGKILL (default 300)
  -h, --help               this message
Environment: PYTHON (default .venv/bin/python), extra XLA_FLAGS are kept.
EOF
}

die() { echo "local_cluster.sh: $*" >&2; exit 2; }

PYTHON=${PYTHON:-.venv/bin/python}
processes= devices= port= log_dir= stream_all=0 kill_on_failure=1 kill_grace=5 term_grace=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes=${2:?}; shift 2 ;;
    --processes=*) processes=${1#*=}; shift ;;
    --devices-per-process) devices=${2:?}; shift 2 ;;
    --devices-per-process=*) devices=${1#*=}; shift ;;
    --port) port=${2:?}; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --log-dir) log_dir=${2:?}; shift 2 ;;
    --log-dir=*) log_dir=${1#*=}; shift ;;
    --stream-all) stream_all=1; shift ;;
    --no-kill) kill_on_failure=0; shift ;;
    --kill-grace) kill_grace=${2:?}; shift 2 ;;
    --kill-grace=*) kill_grace=${1#*=}; shift ;;
    --term-grace) term_grace=${2:?}; shift 2 ;;
    --term-grace=*) term_grace=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (train arguments go after --)" ;;
  esac
done
train_args=("$@")
[[ $processes =~ ^[1-9][0-9]*$ ]] || { usage >&2; die "--processes N (N >= 1) is required"; }
[[ $devices =~ ^[1-9][0-9]*$ ]] || { usage >&2; die "--devices-per-process M (M >= 1) is required"; }
[[ ${#train_args[@]} -gt 0 ]] || { usage >&2; die "no train arguments after --"; }
command -v "$PYTHON" >/dev/null 2>&1 || [[ -x $PYTHON ]] || die "PYTHON=$PYTHON not found"

if [[ -z $port ]]; then
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

if [[ -z $log_dir ]]; then
  workdir=
  for ((i = 0; i < ${#train_args[@]}; i++)); do
    case "${train_args[i]}" in
      --workdir) workdir=${train_args[i + 1]:-} ;;
      --workdir=*) workdir=${train_args[i]#*=} ;;
    esac
  done
  if [[ -n $workdir && $workdir != *://* ]]; then
    log_dir=$workdir/cluster_logs
  else
    log_dir=$(mktemp -d -t local_cluster.XXXXXX)
  fi
fi
mkdir -p "$log_dir"

xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
pids=()
prefixers=()
stop_all() {  # stop_all GRACE: SIGTERM every process, SIGKILL those left after GRACE seconds
  local grace=$1 pid alive t
  for pid in "${pids[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -s KILL "$pid" 2>/dev/null || true; done
}
interrupted=0
on_interrupt() {
  # All processes get SIGTERM together, so they agree to save a checkpoint and stop
  # (train.py's preemption handling); a second Ctrl-C kills them at once.
  if ((interrupted++)); then
    for pid in "${pids[@]}"; do kill -s KILL "$pid" 2>/dev/null || true; done
    exit 130
  fi
  echo "local_cluster.sh: interrupted; asking all processes to checkpoint and stop" \
       "(Ctrl-C again to kill them)" >&2
  stop_all "$term_grace"
  exit 130
}
trap on_interrupt INT TERM

echo "local_cluster.sh: $processes process(es) x $devices CPU device(s), coordinator" \
     "127.0.0.1:$port, logs in $log_dir" >&2
for ((i = 0; i < processes; i++)); do
  cmd=("$PYTHON" -m negclip_jax.train "${train_args[@]}" --coordinator_address "127.0.0.1:$port"
       --num_processes "$processes" --process_id "$i")
  log=$log_dir/process_$i.log
  : >"$log"
  if ((i == 0)); then
    JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${cmd[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${cmd[@]}" >"$log" 2>&1 &
  fi
  pids+=($!)
  if ((i > 0 && stream_all)); then
    tail -n +1 -F --pid="$!" "$log" 2>/dev/null | sed -u "s/^/[process $i] /" >&2 &
    prefixers+=($!)
  fi
done

# Wait for every process; the first failure stops the rest (unless --no-kill).
declare -A index_of
for ((i = 0; i < processes; i++)); do index_of[${pids[i]}]=$i; done
status=0 running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=
  if wait -n -p finished "${running[@]}"; then rc=0; else rc=$?; fi
  [[ -n ${finished:-} ]] || break  # nothing left to wait for
  still=()
  for pid in "${running[@]}"; do [[ $pid == "$finished" ]] || still+=("$pid"); done
  running=("${still[@]}")
  i=${index_of[$finished]}
  if ((rc == 0)); then
    echo "local_cluster.sh: process $i exited 0" >&2
    continue
  fi
  echo "local_cluster.sh: process $i (pid $finished) failed with exit status $rc" >&2
  if ((i > 0)); then
    echo "----- last lines of $log_dir/process_$i.log -----" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
    echo "-----" >&2
  fi
  if ((status == 0)); then
    status=$rc
    if ((kill_on_failure && ${#running[@]} > 0)); then
      echo "local_cluster.sh: stopping the other processes" >&2
      stop_all "$kill_grace"
      for pid in "${running[@]}"; do wait "$pid" 2>/dev/null || true; done
      break
    fi
  fi
done
for pid in "${prefixers[@]}"; do wait "$pid" 2>/dev/null || true; done
if ((status != 0)); then
  echo "local_cluster.sh: FAILED (exit status $status); logs in $log_dir." \
       "Re-run the same command to resume from the latest checkpoint." >&2
fi
exit "$status"
