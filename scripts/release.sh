#!/usr/bin/env bash
# `make release`: builds the plugin reproducibly for each os/arch into OUTDIR and writes OUTDIR/SHA256SUMS.
# The same commit and Go toolchain (go.mod's) give the same bytes: no paths (-trimpath), no build
# ID, no VCS stamp, no cgo, and only the version from the VERSION file stamped in.
# Usage: scripts/release.sh OUTDIR [os/arch ...]   (default: linux and darwin on amd64 and arm64)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
plugin=vault-plugin-secrets-evenergy
version="v$(cat "$root/VERSION")"
out=$1
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(linux/amd64 linux/arm64 darwin/amd64 darwin/arm64)

mkdir -p "$out"
cd "$root"
for target in "${targets[@]}"; do
  os=${target%/*} arch=${target#*/}
  CGO_ENABLED=0 GOOS=$os GOARCH=$arch GOAMD64=v1 GOARM64=v8.0 GOEXPERIMENT= GOFLAGS=-mod=readonly \
    go build -trimpath -buildvcs=false \
    -ldflags "-buildid= -X github.com/evenergy/vault-plugin-secrets-evenergy.Version=$version" \
    -o "$out/${plugin}_${version}_${os}_${arch}" "./cmd/$plugin"
done
cd "$out"
sha256sum "${plugin}_${version}"_* >SHA256SUMS
cat SHA256SUMS
