#!/usr/bin/env bash
# Builds the Vault server pinned in scripts/vault/go.mod from the Go module proxy, once: the binary is
# cached under ~/.cache (keyed by that go.mod and go.sum) and linked at bin/vault.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
module="$root/scripts/vault"
key=$(cat "$module/go.mod" "$module/go.sum" | sha256sum | cut -c1-16)
cached="${XDG_CACHE_HOME:-$HOME/.cache}/vault-plugin-secrets-evenergy/vault-$key"

if [ ! -x "$cached" ]; then
  echo "Building the Vault server (a first build takes 10-16 minutes on 2 cores; later ones reuse it)..."
  mkdir -p "$(dirname "$cached")"
  log=$(mktemp)
  # Vault v1.21.1's own go.mod needs these: the gcp plugin version it pins is not in the checksum database.
  if ! (cd "$module" && GONOSUMDB=github.com/hashicorp/vault-plugin-secrets-gcp GOFLAGS=-mod=mod \
        go build -v -ldflags "-s -w" -o "$cached.tmp" github.com/hashicorp/vault 2>&1 |
        tee "$log" | awk '{ if (++n % 200 == 0) { print "  " n " packages built..."; fflush() } }'); then
    tail -40 "$log"
    echo "Building the Vault server failed; the full log is $log" >&2
    exit 1
  fi
  rm -f "$log"
  mv "$cached.tmp" "$cached"
fi
mkdir -p "$root/bin"
ln -sfn "$cached" "$root/bin/vault"
"$root/bin/vault" version
