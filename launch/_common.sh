# Helpers sourced by the launch scripts (not run on its own).

# quote WORD: shell-quote one word, for display or for a remote command line.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# quote_all WORD...: the words quoted and joined by spaces.
quote_all() { local w out=(); for w; do out+=("$(quote "$w")"); done; echo "${out[*]}"; }

# run CMD...: execute, or print it when the caller set dry_run=1 (--dry-run).
run() {
  if ((dry_run)); then echo "$(quote_all "$@")"; else "$@"; fi
}
