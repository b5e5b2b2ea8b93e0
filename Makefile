# Ambit: `make demo` runs the main job, `make test` runs every test.
# Works on a machine that has only Go (as root it installs what is missing).

GO       ?= go
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
FUZZTIME ?= 5s
FUZZMINTIME ?= 60s
# CI's fuzz smoke counts executions instead of seconds: with a duration,
# Go 1.26's fuzz coordinator can fail a target with a bare "context
# deadline exceeded" as the time runs out (go.dev/issue/75804, fixed in
# Go 1.27), and it did in CI. 20,000 runs take 1-8 s per target here.
FUZZSMOKE ?= 20000x
BENCHTIME ?= 2s
BENCHCOUNT ?= 5

# Every fuzz target, as package:Target.
FUZZ_TARGETS := \
	./internal/identity:FuzzParseID \
	./internal/hbone:FuzzParseAuthority \
	./internal/hbone:FuzzParseForwarded \
	./internal/hbone:FuzzParseBaggage \
	./internal/hbone:FuzzParseTraceparent \
	./internal/hbone:FuzzServerFrames \
	./internal/hbone:FuzzFrameGuard \
	./internal/config:FuzzParse \
	./internal/socks5:FuzzHandshake \
	./internal/trace:FuzzDecodeTCP \
	./internal/xds:FuzzDeltaMessages \
	./internal/kubesource:FuzzTranslate \
	./internal/cni:FuzzParse

FORTIO_VERSION ?= v1.68.2
STATICCHECK_VERSION ?= v0.8.2
K8S_VERSION ?= v1.37.2
ETCD_VERSION ?= v3.7.3
HELM_VERSION ?= v4.3.2
# Kubernetes components built from the module proxy, cached across runs.
K8S_BIN ?= $(HOME)/.cache/ambit/k8s-$(K8S_VERSION)
# Istio's components (istiod, istio-cni, istioctl), the drop-in tests'
# peers, from the istio.io/istio module go.mod requires; cached likewise.
ISTIO_VERSION ?= $(shell awk '$$1 == "istio.io/istio" {print $$2}' go.mod)
ISTIO_BIN ?= $(HOME)/.cache/ambit/istio-$(ISTIO_VERSION)
GOBIN ?= $(shell $(GO) env GOPATH)/bin

.PHONY: helm manifests all build image demo test unit fuzz-smoke fuzz bench bench-smoke bench-tools lint deps clean k8s-bins istio-bins k8s-up k8s-down

all: build

build:
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o bin/ambit ./cmd/ambit

# The container image: the static binary alone, as an OCI layout tar
# (tools/mkimage, go-containerregistry; no registry, no daemon).
IMAGE_REF ?= ambitmesh/ambit:$(VERSION)
image: build
	$(GO) run ./tools/mkimage -binary bin/ambit -out bin/ambit-image.tar -ref $(IMAGE_REF)

demo: build  ## the seed's request in a lab, hop by hop (root)
	./bin/ambit demo

# Everything CI checks: format and vet, each fuzz target briefly, one pass of
# every benchmark, and last (so its summary closes the log) the unit and
# integration tests under the race detector.
test: deps lint fuzz-smoke bench-smoke unit

unit: k8s-bins istio-bins helm
	K8S_BIN=$(K8S_BIN) ISTIO_BIN=$(ISTIO_BIN) HELM=$(GOBIN)/helm $(GO) test -race -count=1 ./...

fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZSMOKE) FUZZMINTIME=200x

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINTIME) $$pkg; \
	done

# One pass of every Go benchmark, then (as root, as in CI) the lab suite's
# quick run: seconds per scenario, so neither rots.
bench-smoke: build k8s-bins helm
	K8S_BIN=$(K8S_BIN) HELM=$(GOBIN)/helm $(GO) test -run '^$$' -bench . -benchtime 1x ./...
	@if [ "$$(id -u)" = 0 ]; then \
		$(MAKE) --no-print-directory bench-tools && \
		PATH="$(GOBIN):$$PATH" ./bin/ambit bench --quick --lab-name benchsmoke; \
	else echo "SKIP: the lab bench (ambit bench --quick) needs root"; fi

# The figures in docs/benchmarks.md come from this target: the loopback
# benchmarks (HBONE vs TLS vs TCP; one hop vs Istio's Go HBONE), then the
# lab suite (needs root).
bench: build bench-tools
	$(GO) test -run '^$$' -bench 'Throughput|Hop' -benchtime $(BENCHTIME) -count $(BENCHCOUNT) ./internal/hbone ./internal/bench | tee bench.out
	PATH="$(GOBIN):$$PATH" ./bin/ambit bench --out bench-lab.md

# The load generators the lab suite runs: iperf3 from Debian, fortio from
# the Go module proxy.
bench-tools:
	@command -v iperf3 >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing iperf3"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; \
		else echo "iperf3 is missing: install it (apt-get install iperf3)"; exit 1; fi; }
	@test -x "$(GOBIN)/fortio" || { echo "installing fortio $(FORTIO_VERSION)"; $(GO) install fortio.org/fortio@$(FORTIO_VERSION); }

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@$(GOBIN)/staticcheck -version 2>/dev/null | grep -qF '($(STATICCHECK_VERSION:v%=%))' || \
		{ echo "installing staticcheck $(STATICCHECK_VERSION)"; $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION); }
	$(GOBIN)/staticcheck ./...

# openssl is used by a test that loads a CA made by another tool; containerd
# and runc by the image's test (tools/mkimage) and the test cluster, with
# the standard CNI plugins (/usr/lib/cni); nft by istio-cni's test image.
deps:
	@command -v openssl >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing openssl"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; \
		else \
			echo "note: openssl is missing and cannot be installed here (not root); its test will say SKIP"; \
		fi; }
	@{ command -v containerd && command -v runc && command -v nft && test -x /usr/lib/cni/bridge; } >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing containerd, runc, the CNI plugins and nft (istio-cni's image carries it)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc containernetworking-plugins nftables >/dev/null; \
		else \
			echo "note: containerd, runc or the CNI plugins are missing and cannot be installed here (not root); their tests need root anyway"; \
		fi; }

# etcd and the Kubernetes components from the Go module proxy into
# $(K8S_BIN), once: the control plane's tests run against the API server,
# the cluster tests against all of them (13.5 minutes cold on two
# cores, then cached).
k8s-bins:
	GO=$(GO) scripts/k8s-bins.sh $(K8S_VERSION) $(ETCD_VERSION) $(K8S_BIN)

istio-bins:
	GO=$(GO) scripts/istio-bins.sh $(ISTIO_VERSION) $(ISTIO_BIN)

# The seed's cluster, master and worker1, on this machine (root): each node
# a kubelet with its own containerd in namespaces of its own, the control
# plane on the lab's wire (internal/kubetest). `make k8s-down` removes all
# of it. kubectl: `go run ./tools/k8scluster kubectl -- get pods -A`.
k8s-up: deps k8s-bins image
	K8S_BIN=$(K8S_BIN) $(GO) run ./tools/k8scluster up -image bin/ambit-image.tar -ambit-tag $(VERSION)

k8s-down:
	K8S_BIN=$(K8S_BIN) $(GO) run ./tools/k8scluster down

# The helm CLI from the Go module proxy, for the chart's tests and
# `make manifests`.
helm:
	@$(GO) version -m $(GOBIN)/helm 2>/dev/null | grep -q 'mod	helm.sh/helm/v4	$(HELM_VERSION)	' || \
		{ echo "installing helm $(HELM_VERSION)"; $(GO) install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION); }

# deploy/ambit.yaml: the chart rendered for kubectl users (a test checks
# it is current).
manifests: helm
	$(GOBIN)/helm template ambit deploy/helm/ambit --namespace ambit-system > deploy/ambit.yaml

clean:
	rm -rf bin bench.out bench-lab.md
