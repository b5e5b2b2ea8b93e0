#!/usr/bin/env bash
# Builds Istio's own components, the peers of the drop-in tests, from the
# istio.io/istio module at ISTIO_VERSION into OUT, once per version:
# pilot-discovery (istiod), install-cni (istio-cni's node agent), istio-cni
# (its CNI plugin) and istioctl. A throwaway module requires them as tools
# (`go get -tool`) and `go build tool` builds them all in one go. Measured on
# a 2 vCPU VM with the modules not yet downloaded (2026-12-04): 7 min wall
# (11 min user), 4 binaries of 85-130 MB.
#
# usage: scripts/istio-bins.sh ISTIO_VERSION OUT
set -euo pipefail
v=${1:?istio.io/istio module version, e.g. v0.0.0-20260827124520-eed52ebb66ad} out=${2:?output directory}
go=${GO:-go}
tools="pilot/cmd/pilot-discovery cni/cmd/install-cni cni/cmd/istio-cni istioctl/cmd/istioctl"
stamp="$out/.built-$v"
missing=""
for t in $tools; do
	[ -x "$out/${t##*/}" ] || missing="$missing $t"
done
if [ -f "$stamp" ] && [ -z "$missing" ]; then
	exit 0
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf 'module ambitistiobins\n\ngo 1.26.0\n' >"$work/go.mod"
echo "building Istio's components at $v (about 7 minutes the first time)"
args=""
for t in $tools; do args="$args istio.io/istio/$t@$v"; done
# shellcheck disable=SC2086
(cd "$work" && "$go" get -tool $args >/dev/null 2>&1 || (cd "$work" && "$go" get -tool $args))
(cd "$work" && CGO_ENABLED=0 "$go" build -trimpath -ldflags "-s -w" -o "$out/" tool)
touch "$stamp"
