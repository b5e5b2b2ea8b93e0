# Ambit: `make demo` runs the main job, `make test` runs every test.
# Works on a machine that has only Go (as root it installs what is missing).

GO       ?= go
VERSION  ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
FUZZTIME ?= 5s
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
	./internal/config:FuzzParse \
	./internal/socks5:FuzzHandshake

.PHONY: all build demo test unit fuzz-smoke fuzz bench bench-smoke lint deps clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ambit ./cmd/ambit

demo: build  ## the seed's request in a lab, hop by hop (root)
	./bin/ambit demo

# Everything CI checks: format and vet, each fuzz target briefly, one pass of
# every benchmark, and last (so its summary closes the log) the unit and
# integration tests under the race detector.
test: deps lint fuzz-smoke bench-smoke unit

unit:
	$(GO) test -race -count=1 ./...

fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZTIME)

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz $$name ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

bench-smoke:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./...

# The figures in docs/benchmarks.md come from this target.
bench:
	$(GO) test -run '^$$' -bench Throughput -benchtime $(BENCHTIME) -count $(BENCHCOUNT) ./internal/hbone | tee bench.out

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# openssl is used by a test that loads a CA made by another tool.
deps:
	@command -v openssl >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing openssl"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; \
		else \
			echo "note: openssl is missing and cannot be installed here (not root); its test will say SKIP"; \
		fi; }

clean:
	rm -rf bin bench.out
