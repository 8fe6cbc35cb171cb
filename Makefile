# patchcord: build, generate, test, demo, bench.
# `make` needs only Go: the bpf2go output is committed.

GO        ?= go
CLANG     ?= clang-19
STRIP     ?= llvm-strip-19
BIN       := $(CURDIR)/bin
GOBIN_DIR := $(BIN)/tools
CNI_DIR   := $(BIN)/cni
CNI_VERSION     := v1.3.0
PLUGINS_VERSION := v1.10.0

export BPF2GO_CC    := $(CLANG)
export BPF2GO_STRIP := $(STRIP)

.PHONY: all build generate check-generate deps tools test demo bench clean

all: build

build:
	$(GO) build -o $(BIN)/patchcord ./cmd/patchcord
	$(GO) build -o $(BIN)/patchcord-cni ./cmd/patchcord-cni

generate:
	$(GO) generate ./pkg/datapath/

# Fails when the committed objects differ from what this tree generates.
check-generate: generate
	git diff --exit-code -- pkg/datapath/

clean:
	rm -rf $(BIN)
