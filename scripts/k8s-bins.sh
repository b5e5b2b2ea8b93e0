#!/usr/bin/env bash
# Builds etcd and the Kubernetes components (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kubectl) from the Go
# module proxy into OUT, once per version (a later run finds them and
# returns; a component missing is built alone). k8s.io/kubernetes cannot be
# `go install`ed (its go.mod replaces its staging modules with local paths),
# so a throwaway module requires it together with each staging module at the
# matching v0.x version; etcd's server module has replace directives too, so
# it gets a module of its own. Measured on a 2 vCPU VM, cold module and
# build caches (2026-12-04): 13.5 min in all, kube-apiserver 8.5 min with
# the modules' download, kube-controller-manager 2.4, etcd 1, kubelet 0.8,
# kubectl 0.7, kube-scheduler 0.3.
#
# usage: scripts/k8s-bins.sh K8S_VERSION ETCD_VERSION OUT
set -euo pipefail
k8s=${1:?kubernetes version, e.g. v1.37.2} etcd=${2:?etcd version, e.g. v3.7.3} out=${3:?output directory}
go=${GO:-go}
components="kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl"
stamp="$out/.built-$k8s-$etcd"
missing=""
for c in $components; do
	[ -x "$out/$c" ] || missing="$missing $c"
done
if [ -f "$stamp" ] && [ -z "$missing" ] && [ -x "$out/etcd" ]; then
	exit 0
fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
staging_version="v0.${k8s#v1.}"

# The Kubernetes components, from one throwaway module.
mkdir -p "$work/k8s"
gomod=$(cd "$work/k8s" && GOFLAGS=-mod=mod "$go" mod download -json "k8s.io/kubernetes@$k8s" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
{
	printf 'module ambitk8sbins\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/kubernetes %s\n' "$k8s"
	grep -E '^\s+k8s.io/[a-z-]+ v0\.0\.0$' "$gomod" | awk -v v="$staging_version" '{printf "\t%s %s\n", $1, v}'
	printf ')\n'
} >"$work/k8s/go.mod"
{
	printf '//go:build tools\n\npackage tools\n\nimport (\n'
	for c in $components; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
	printf ')\n'
} >"$work/k8s/tools.go"
(cd "$work/k8s" && "$go" mod tidy >/dev/null 2>&1)
for c in ${missing:-$components}; do
	echo "building $c $k8s (kube-apiserver takes about 5 minutes the first time, kubelet 2)"
	(cd "$work/k8s" && CGO_ENABLED=0 "$go" build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$k8s" -o "$out/$c" "k8s.io/kubernetes/cmd/$c")
done

# etcd
[ -x "$out/etcd" ] && [ -f "$stamp" ] || {
mkdir -p "$work/etcd"
printf 'module ambitetcdbin\n\ngo 1.26.0\n' >"$work/etcd/go.mod"
printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$work/etcd/tools.go"
echo "building etcd $etcd"
(cd "$work/etcd" && "$go" get "go.etcd.io/etcd/server/v3@$etcd" "go.etcd.io/etcd/api/v3@$etcd" "go.etcd.io/etcd/client/pkg/v3@$etcd" \
	"go.etcd.io/etcd/client/v3@$etcd" "go.etcd.io/etcd/pkg/v3@$etcd" >/dev/null 2>&1 &&
	CGO_ENABLED=0 "$go" build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
}
touch "$stamp"
"$out/kube-apiserver" --version
"$out/etcd" --version | head -1
