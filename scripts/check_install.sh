#!/usr/bin/env bash
# Builds the wheel, installs it with an extra into a fresh venv from the package index
# (no requirements file), then, from outside the repository: negclip-train --help, a
# 2-step tiny run (which exports), negclip-export of that run, and the given tests (paths
# relative to the repository; `tests` for the suite) against the installed package, from a
# copy of the repository without negclip_jax/.
#   scripts/check_install.sh [EXTRA [TEST ...]]   e.g. tpu, or test tests
# With the torch or test extra, torch's CPU build is installed first (PyPI's default
# torch wheels for Linux pull the CUDA libraries), from $TORCH_INDEX (default PyTorch's CPU
# index; TORCH_INDEX= uses only the configured index, e.g. an offline mirror).
set -euo pipefail
extra=${1:-}
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export JAX_PLATFORMS=cpu
start=$SECONDS
mkdir "$tmp/src"
cp -r "$repo/negclip_jax" "$repo/pyproject.toml" "$repo/README.md" "$tmp/src/"
python3 -m venv "$tmp/venv"
pip="$tmp/venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" wheel -q --no-deps "$tmp/src" -w "$tmp/dist"
if [[ $extra == torch || $extra == test ]]; then
  index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
  "$pip" install -q ${index:+--extra-index-url "$index"} "torch==2.13.0+cpu"
fi
"$pip" install -q "$(ls "$tmp"/dist/*.whl)${extra:+[$extra]}"
if [[ $extra == test ]]; then  # see pyproject.toml: open_clip without torchvision
  "$pip" install -q --no-deps open_clip_torch==3.3.0
fi
echo "installed ${extra:-no extra} in $((SECONDS - start)) s: $("$pip" freeze | wc -l) packages"
if [[ $extra == torch || $extra == test ]]; then  # the extra must keep the CPU torch
  torch=$("$tmp/venv/bin/python" -c 'import torch; print(torch.__version__)')
  [[ $torch == 2.13.0+cpu ]] || { echo "torch $torch replaced torch 2.13.0+cpu" >&2; exit 1; }
fi
"$pip" freeze | grep -iE "^(jax|jaxlib|libtpu|jax-cuda12-plugin|torch|torchvision|tensorflow-cpu|nvidia-[a-z0-9-]+)==" | tr "\n" " "; echo
cd "$tmp"
"$tmp/venv/bin/negclip-train" --help > /dev/null
"$tmp/venv/bin/negclip-train" --config tiny --workdir "$tmp/run" --config.total_steps=2 \
  2> "$tmp/train.log" | tail -2
"$tmp/venv/bin/negclip-export" "$tmp/run" --format hf --out "$tmp/export" 2> "$tmp/export.log"
if (($#)); then
  # The repository without its package source: tests, configs aliases, launch scripts.
  # Tests and their subprocesses put this copy on the path, so only the installed
  # negclip_jax can be imported.
  mkdir "$tmp/repo"
  (cd "$repo" && git ls-files --cached --others --exclude-standard | grep -v '^negclip_jax/' |
    tar -cf - -T -) | tar -xf - -C "$tmp/repo"
  cd "$tmp/repo"
  installed=$("$tmp/venv/bin/python" -c 'import negclip_jax; print(negclip_jax.__file__)')
  [[ $installed == "$tmp/venv/"* ]] || { echo "imports $installed, not the install" >&2; exit 1; }
  PYTHON="$tmp/venv/bin/python" "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
fi
echo "ok in $((SECONDS - start)) s"
