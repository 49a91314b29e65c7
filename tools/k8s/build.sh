#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from
# the Go modules pinned in this directory's go.mod, once, into a cache
# directory keyed by their versions:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/llamajob/k8s/<kubernetes>-etcd<etcd>/
# (LLAMAJOB_K8S_CACHE replaces the llamajob/k8s part).
#
# If KUBEBUILDER_ASSETS is set (envtest's convention), that directory is used
# as it is and nothing is built; it must hold all four binaries.
#
# Progress goes to stderr; the directory holding the binaries is printed on
# stdout as the last line, so `dir=$(tools/k8s/build.sh)` works.
# Any failure stops the script with the tool's own error: there is no fallback.
set -euo pipefail

BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf 'k8s-build: %s\n' "$*" >&2; }
die() { printf 'k8s-build: error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  missing=()
  for b in "${BINARIES[@]}"; do
    [[ -x "$KUBEBUILDER_ASSETS/$b" ]] || missing+=("$b")
  done
  if ((${#missing[@]})); then
    die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks: ${missing[*]} (unset it to build them from tools/k8s/go.mod)"
  fi
  log "using KUBEBUILDER_ASSETS"
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

command -v go >/dev/null || die "go is not on PATH (Go >= 1.26 is needed to build the control plane)"
# Never download another toolchain behind the caller's back.
export GOTOOLCHAIN=local
export GOFLAGS="-mod=readonly ${GOFLAGS:-}"

cd "$here"
k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
etcd_version=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
[[ "$k8s_version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "unexpected k8s.io/kubernetes version: $k8s_version"
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}

root=${LLAMAJOB_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamajob/k8s}
dir="$root/${k8s_version#v}-etcd${etcd_version#v}"
stamp="$dir/.complete"

if [[ -f "$stamp" ]]; then
  log "cached: kubernetes $k8s_version, etcd $etcd_version"
  echo "$dir"
  exit 0
fi

mkdir -p "$dir"
# One build at a time per cache directory; a second caller waits, then finds the stamp.
exec 9>"$dir.lock"
flock 9
if [[ -f "$stamp" ]]; then
  log "built meanwhile by another process: kubernetes $k8s_version, etcd $etcd_version"
  echo "$dir"
  exit 0
fi

log "kubernetes $k8s_version, etcd $etcd_version, $(go version | cut -d' ' -f3) -> $dir"
start=$SECONDS
log "downloading modules"
go mod download
log "modules ready ($((SECONDS - start))s)"

# The version the binaries report (kubectl version, /version), as Kubernetes'
# own release build stamps it.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done

for b in "${BINARIES[@]}"; do
  t=$SECONDS
  log "building $b"
  # -buildvcs=false: the binaries depend on the pinned versions only, not on
  # this repository's commit.
  CGO_ENABLED=0 go build -trimpath -buildvcs=false -ldflags "$ldflags" -o "$dir/$b.partial" "./cmd/$b"
  mv -f "$dir/$b.partial" "$dir/$b"
  log "built $b ($((SECONDS - t))s, $(du -h "$dir/$b" | cut -f1))"
done

printf 'kubernetes %s\netcd %s\n%s\n' "$k8s_version" "$etcd_version" "$(go version)" >"$stamp"
log "done in $((SECONDS - start))s"
echo "$dir"
