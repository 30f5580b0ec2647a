#!/usr/bin/env bash
# Builds the wheel, installs it with an extra into a fresh venv from the package index
# (no requirements file), and trains + exports the tiny preset from outside the repository.
#   scripts/check_install.sh [EXTRA]      (EXTRA: tpu | cuda12 | torch | test; default: none)
set -euo pipefail
extra=${1:+[$1]}
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS
cp -r "$repo/negclip_jax" "$repo/pyproject.toml" "$repo/README.md" "$tmp/"
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" wheel -q --no-deps "$tmp" -w "$tmp/dist"
"$tmp/venv/bin/pip" install -q "$(ls "$tmp"/dist/*.whl)$extra"
echo "installed in $((SECONDS - start)) s: $("$tmp/venv/bin/pip" freeze | wc -l) packages"
cd "$tmp"
"$tmp/venv/bin/negclip-train" --help > /dev/null
JAX_PLATFORMS=cpu "$tmp/venv/bin/negclip-train" --config tiny --workdir "$tmp/run" \
    --config.total_steps=2 | tail -2
"$tmp/venv/bin/negclip-export" "$tmp/run" --format hf --out "$tmp/export"
"$tmp/venv/bin/python" -c "import transformers; print('transformers loads', \
  transformers.CLIPModel.from_pretrained('$tmp/export').config.architectures)" 2>/dev/null \
  || echo "(transformers.CLIPModel needs torch: install the [torch] extra to load it here)"
echo "ok in $((SECONDS - start)) s"
