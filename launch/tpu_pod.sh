#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create (or reuse) the TPU, copy this code to every
# worker, install requirements, start the same training command on all workers
# (`--distributed`: jax.distributed.initialize() auto-detects the pod), stream worker 0's log.
#
#   launch/tpu_pod.sh --zone us-central2-b --workdir gs://BUCKET/runs/omni \
#       [--project P] [--name negclip-pod] [--accelerator-type v4-32] \
#       [--config configs/omni_negclip_vitb32.py] [-- --config.batch_size=1024 ...]
#   launch/tpu_pod.sh --zone us-central2-b --name negclip-pod --teardown   # delete the TPU
#
# --preflight first compiles the run's programs for the slice here, with the TPU compiler
# and no TPU (negclip-compile, `pip install ".[tpu]"`), and creates nothing when the
# training step does not fit the chips' memory (the changes that would make it fit are
# printed).
#
# Resume after preemption (or any failure): re-run the same command. A preempted TPU is
# deleted and recreated, the code re-copied, and training resumes from the latest
# checkpoint in the workdir (which is why the workdir must be a gs:// bucket: it outlives
# the TPU). Re-running while training is still going just re-attaches to the log.
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options (environment variables in brackets):
  --project P            GCP project [PROJECT; default: gcloud's configured project]
  --zone Z               TPU zone, required [ZONE]
  --name N               TPU name [TPU_NAME; default negclip-pod]
  --accelerator-type T   slice type [ACCELERATOR_TYPE; default v4-32 = 4 hosts x 4 chips]
  --version V            TPU VM image [TPU_VERSION; default tpu-ubuntu2204-base]
  --spot                 create a Spot TPU (cheaper, preemptible; re-run to resume)
  --config C             training config [CONFIG; default configs/omni_negclip_vitb32.py,
                         the paper's float32 run; configs/omni_negclip_vitb32_tpu.py is the
                         same run with the TPU speed choices: bfloat16, fsdp, remat]
  --workdir W            run directory [WORKDIR]: gs://BUCKET/PATH, read and written by
                         every worker directly (no mount; all hosts must share it)
  --repo URL [--ref R]   git clone URL (checkout R) on the workers instead of copying
                         this working tree as a tarball
  --python BIN           Python on the workers [default python3.11; apt-installed if missing]
  --skip-install         do not (re)install requirements on the workers
  --no-follow            start training and return without streaming the log
  --teardown             delete the TPU and exit
  --preflight            compile for the slice here first (negclip-compile, the `tpu`
                         extra; Python: PREFLIGHT_PYTHON, default .venv/bin/python or
                         python3); stop without creating anything if it does not fit
  --dry-run              print every command instead of running it (gcloud not needed)
  -h, --help             this message
Everything after -- is passed to `python -m negclip_jax.train` (e.g. --config.key=value).
The log of worker i is ~/negclip_train.log on that worker:
  gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=i --command 'tail -F ~/negclip_train.log'
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

project=${PROJECT:-} zone=${ZONE:-} name=${TPU_NAME:-negclip-pod}
accelerator=${ACCELERATOR_TYPE:-v4-32} version=${TPU_VERSION:-tpu-ubuntu2204-base}
config=${CONFIG:-configs/omni_negclip_vitb32.py} workdir=${WORKDIR:-}
repo= ref= python_bin=python3.11 spot=0 skip_install=0 follow=1 teardown=0 dry_run=0
preflight=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project|--zone|--name|--accelerator-type|--version|--config|--workdir|--repo|--ref|--python)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --project) project=$2 ;; --zone) zone=$2 ;; --name) name=$2 ;;
        --accelerator-type) accelerator=$2 ;; --version) version=$2 ;; --config) config=$2 ;;
        --workdir) workdir=$2 ;; --repo) repo=$2 ;; --ref) ref=$2 ;; --python) python_bin=$2 ;;
      esac
      shift 2 ;;
    --spot) spot=1; shift ;;
    --skip-install) skip_install=1; shift ;;
    --no-follow) follow=0; shift ;;
    --teardown) teardown=1; shift ;;
    --preflight) preflight=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option '$1' (training flags go after --)" ;;
  esac
done
extra_args=("$@")
[[ -n $zone ]] || { usage >&2; die "--zone is required"; }
root=$(cd "$(dirname "$0")/.." && pwd)
source "$(dirname "$0")/_common.sh"  # quote, quote_all, run

# ---------------------------------------------------------------------- 0. preflight
if ((preflight && !teardown)); then
  py=${PREFLIGHT_PYTHON:-$([[ -x $root/.venv/bin/python ]] && echo "$root/.venv/bin/python" || echo python3)}
  check=("$py" -m negclip_jax.compile --config "$config" --topology "$accelerator" --nocost_model
    "${extra_args[@]}")  # the fit check: no second compile for the cost model's time
  if ((dry_run)); then
    echo "(cd $(quote "$root") && $(quote_all "${check[@]}"))"
  else
    echo "tpu_pod.sh: preflight: compiling for $accelerator (negclip-compile; minutes)" >&2
    (cd "$root" && "${check[@]}") ||
      die "preflight: the run does not fit or does not compile on $accelerator (above); no TPU created"
  fi
fi

if ((!dry_run)) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found (install the Google Cloud CLI, or use --dry-run)"
fi

loc=(--zone="$zone")
[[ -n $project ]] && loc+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
# on_workers WORKERS REMOTE_COMMAND: run a bash command line on the workers.
on_workers() { run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker="$1" --command="$2"; }

if ((teardown)); then
  run "${tpu[@]}" delete "$name" "${loc[@]}" --quiet
  exit 0
fi
[[ -n $workdir ]] || { usage >&2; die "--workdir is required (gs://BUCKET/PATH on a pod)"; }

# ---------------------------------------------------------------------- 1. the TPU
create=("${tpu[@]}" create "$name" "${loc[@]}" --accelerator-type="$accelerator"
        --version="$version")
((spot)) && create+=(--spot)
describe=("${tpu[@]}" describe "$name" "${loc[@]}" --format='value(state)')
if ((dry_run)); then
  echo "# reuse the TPU if it exists and is READY; delete it first if PREEMPTED/TERMINATED"
  run "${describe[@]}"
  run "${create[@]}"
else
  state=$("${describe[@]}" 2>/dev/null || true)
  case "$state" in
    READY) echo "tpu_pod.sh: reusing TPU $name (READY)" >&2 ;;
    "") echo "tpu_pod.sh: creating TPU $name ($accelerator)" >&2; run "${create[@]}" ;;
    PREEMPTED|TERMINATED|STOPPED)
      echo "tpu_pod.sh: TPU $name is $state: recreating it (training resumes from the" \
           "latest checkpoint in $workdir)" >&2
      run "${tpu[@]}" delete "$name" "${loc[@]}" --quiet
      run "${create[@]}" ;;
    *) echo "tpu_pod.sh: TPU $name is $state; waiting for READY" >&2
      until [[ $("${describe[@]}") == READY ]]; do sleep 20; done ;;
  esac
fi

# ---------------------------------------------------------------------- 2. the code
code_dir='~/negclip_jax'  # expanded on the workers
if [[ -n $repo ]]; then
  checkout=${ref:+" && git -C $code_dir checkout --quiet $(quote "$ref")"}
  on_workers all "set -e; if [ -d $code_dir/.git ]; then git -C $code_dir fetch --quiet origin; \
else git clone --quiet $(quote "$repo") $code_dir; fi$checkout"
else
  tarball=${TMPDIR:-/tmp}/negclip_jax_code.tgz
  if ((dry_run)); then
    echo "(cd $(quote "$root") && git ls-files -z --cached --others --exclude-standard |" \
         "tar czf $(quote "$tarball") --null -T -)"
  else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
       tar czf "$tarball" --null -T -)
  fi
  run "${tpu[@]}" scp --recurse "$tarball" "$name:~/negclip_jax_code.tgz" "${loc[@]}" --worker=all
  on_workers all "set -e; mkdir -p $code_dir && tar xzf ~/negclip_jax_code.tgz -C $code_dir"
fi

# ---------------------------------------------------------------------- 3. requirements
if ((!skip_install)); then
  py=$(quote "$python_bin")
  on_workers all "set -e; cd $code_dir; \
if ! command -v $py >/dev/null; then sudo apt-get update -qq && \
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv; fi; \
[ -x .venv/bin/python ] || $py -m venv .venv; \
.venv/bin/pip install -q --upgrade pip; \
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'; \
.venv/bin/pip install -q --no-deps --no-build-isolation -e ."
fi

# ---------------------------------------------------------------------- 4. training
# gs:// paths (workdir, data) go straight to the trainer: Orbax, tensorstore and etils epath
# read and write the bucket themselves, with the TPU VM's service account; nothing is mounted.
train_cmd="python -m negclip_jax.train --config $(quote "$config") --workdir $(quote "$workdir") \
--distributed${extra_args[*]:+ $(quote_all "${extra_args[@]}")}"
# Idempotent: a worker whose trainer is still running (pid file) is left alone.
running='[ -f ~/negclip_train.pid ] && grep -qs negclip_jax "/proc/$(cat ~/negclip_train.pid)/cmdline"'
on_workers all "set -e; cd $code_dir; if $running; \
then echo \"\$(hostname): training already running\"; else \
setsid nohup .venv/bin/$train_cmd > ~/negclip_train.log 2>&1 < /dev/null & \
echo \$! > ~/negclip_train.pid; fi"

# ---------------------------------------------------------------------- 5. logs
if ((follow)); then
  echo "# worker 0's log (Ctrl-C stops streaming, not training)" >&2
  on_workers 0 "if $running; then tail -n +1 -F --pid=\"\$(cat ~/negclip_train.pid)\" \
~/negclip_train.log; else cat ~/negclip_train.log; fi"
fi
