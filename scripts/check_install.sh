#!/usr/bin/env bash
# Builds the wheel, installs it with an extra into a fresh venv from the package index
# (no requirements file), then, from outside the repository: negclip-train --help, a
# 2-step tiny run (which exports), negclip-export of that run, and the given tests run
# against the installed package.
#   scripts/check_install.sh [EXTRA [TEST ...]]   e.g. tpu, or test tests/test_export.py
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
echo "installed ${extra:-no extra} in $((SECONDS - start)) s: $("$pip" freeze | wc -l) packages"
cd "$tmp"
"$tmp/venv/bin/negclip-train" --help > /dev/null
"$tmp/venv/bin/negclip-train" --config tiny --workdir "$tmp/run" --config.total_steps=2 \
  2> "$tmp/train.log" | tail -2
"$tmp/venv/bin/negclip-export" "$tmp/run" --format hf --out "$tmp/export" 2> "$tmp/export.log"
if (($#)); then
  mkdir "$tmp/tests"
  for t in tests/conftest.py tests/references.py "$@"; do  # paths relative to the repository
    cp "$repo/$t" "$tmp/tests/"
  done
  "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider "$tmp/tests"
fi
echo "ok in $((SECONDS - start)) s"
