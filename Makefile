# patchcord: build, generate, test, demo, bench.
# `make` needs only Go: the bpf2go output is committed. `make test` and
# `make demo` install what they lack (Debian packages, cnitool, reference
# CNI plugins) and must run as root.

GO        ?= go
CLANG     ?= clang-19
STRIP     ?= llvm-strip-19
BIN       := $(CURDIR)/bin
TOOLS     := $(BIN)/tools
CNI_BIN   := $(BIN)/cni
CNI_VERSION     := v1.3.0
PLUGINS_VERSION := v1.10.0
# The first cri-tools tag `go install` accepts (no replace directives).
CRICTL_VERSION  := v1.34.0
DEB_PACKAGES    := clang-19 llvm-19 libbpf-dev linux-libc-dev bpftool iproute2 iputils-ping \
                   iperf3 sockperf iptables nftables conntrack ethtool python3 ruby curl \
                   containerd runc strace bird2

export BPF2GO_CC    := $(CLANG)
export BPF2GO_STRIP := $(STRIP)
# Where tests and the demo find the binaries and tools.
export PATCHCORD_BIN := $(BIN)
export CNI_PLUGINS   := $(CNI_BIN)
export CNITOOL       := $(TOOLS)/cnitool
export CRICTL        := $(TOOLS)/crictl
export KUBE_BIN      := $(BIN)/k8s

.PHONY: all build generate check-generate deps tools k8s test fuzz test-kernels demo bench clean

all: build

build:
	$(GO) build -o $(BIN)/patchcord ./cmd/patchcord
	$(GO) build -o $(BIN)/patchcord-cni ./cmd/patchcord-cni
	$(GO) build -o $(BIN)/patchcord-install ./deploy/install

generate: deps
	$(GO) generate ./pkg/datapath/

# Fails when the committed objects differ from what this tree generates.
check-generate: generate
	git diff --exit-code -- pkg/datapath/ || { echo "generated files are stale: run make generate and commit"; exit 1; }

# install-missing PACKAGES: installs only the Debian packages that are missing.
# No package's daemon starts (containerd, bird): tests run their own, each in
# its lab's namespaces; one in the root namespace would touch the machine.
define install-missing
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		policy=; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; policy=1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; rc=$$?; \
		[ -z "$$policy" ] || rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi
endef

deps:
	$(call install-missing,$(DEB_PACKAGES))

tools: $(TOOLS)/cnitool $(TOOLS)/crictl $(CNI_BIN)/host-local

$(TOOLS)/cnitool:
	GOBIN=$(TOOLS) $(GO) install github.com/containernetworking/cni/cnitool@$(CNI_VERSION)

$(TOOLS)/crictl:
	GOBIN=$(TOOLS) $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)

$(CNI_BIN)/host-local:
	GOBIN=$(CNI_BIN) $(GO) install \
		github.com/containernetworking/plugins/plugins/ipam/host-local@$(PLUGINS_VERSION) \
		github.com/containernetworking/plugins/plugins/main/ptp@$(PLUGINS_VERSION) \
		github.com/containernetworking/plugins/plugins/main/bridge@$(PLUGINS_VERSION) \
		github.com/containernetworking/plugins/plugins/main/loopback@$(PLUGINS_VERSION) \
		github.com/containernetworking/plugins/plugins/meta/portmap@$(PLUGINS_VERSION) \
		github.com/containernetworking/plugins/plugins/meta/bandwidth@$(PLUGINS_VERSION) \
		github.com/containernetworking/plugins/plugins/meta/tuning@$(PLUGINS_VERSION)

# Kubernetes for the lab's real clusters: etcd, the control plane, kubelet,
# kube-proxy and agnhost (the e2e tests' server image), built from the Go
# module proxy through test/k8s/go.mod, whose require line is the one place
# the version is named; CoreDNS through test/coredns/go.mod.
KUBE_VERSION = $(shell awk '$$1 == "require" {$$1 = ""; $$0 = $$0} $$1 == "k8s.io/kubernetes" {print $$2}' test/k8s/go.mod)
KUBE_LDFLAGS = -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
	-X k8s.io/component-base/version.gitMajor=$(word 1,$(subst ., ,$(KUBE_VERSION:v%=%))) \
	-X k8s.io/component-base/version.gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION:v%=%)))
# The tool block of test/k8s/go.mod lists what is built (etcd's command is
# named server there). Static, as Kubernetes releases them: agnhost goes
# into an image that holds nothing else.
k8s: $(KUBE_BIN)/.built

$(KUBE_BIN)/.built: test/k8s/go.mod test/k8s/go.sum test/coredns/go.mod test/coredns/go.sum
	cd test/k8s && CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(KUBE_LDFLAGS)' -o $(KUBE_BIN)/ \
		$$(awk '/^tool \(/{t=1; next} t && /^\)/{t=0} t {print $$1}' go.mod)
	mv $(KUBE_BIN)/server $(KUBE_BIN)/etcd
	cd test/coredns && CGO_ENABLED=0 $(GO) build -trimpath -o $(KUBE_BIN)/ github.com/coredns/coredns
	touch $@

# The lab suites run a second time with the tc backend (clsact + cls_bpf,
# what kernels before 6.6 get) forced on this kernel.
TC_SUITES := ./test/samenode/ ./test/crossnode/ ./test/chaining/ ./test/hostile/
test: deps tools build k8s
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 40m ./...
	PATCHCORD_TEST_ATTACH_MODE=tc $(GO) test -count=1 -timeout 20m $(TC_SUITES)

# Each fuzz target for a bounded time; its seed corpus (testdata/fuzz) runs
# in `make test` too. Needs root: the targets load the datapath.
FUZZTIME ?= 20s
FUZZ_TARGETS := FuzzFromPod FuzzFromUplink
fuzz: deps
	for t in $(FUZZ_TARGETS); do \
		$(GO) test -run '^$$' -fuzz "^$$t\$$" -fuzztime $(FUZZTIME) ./pkg/datapath/ || exit 1; \
	done

# Kernel matrix (test/kernels/run.sh): Debian's kernels under qemu TCG run the datapath unit
# tests and the lab tests (same node, across nodes, kill -9), compiled here, on the host's
# binaries and tools. KERNELS="debian12 debian11" adds Debian 11's 5.10; kernels are cached
# in $$XDG_CACHE_HOME. A failing guest test fails the target.
# KERNEL_RUN picks what the guests run (BINARY:PACKAGE[:RUN] each, see run.sh); empty: all of
# it, about an hour per kernel under emulation. KERNEL_CI is CI's pick, 8-15 minutes
# depending on the host CPU (run.sh cuts the VM off at 25): the branches that differ between kernels (features, decap modes, encap, redirect,
# tc attach, NAT check), pods on one node, the three-node mesh with bulk TCP, and both kill -9
# tests (the agent's, mid-flow, and the plugin's, at each step of ADD, through cnitool).
KERNELS ?= debian12
KERNEL_TESTS := pkg/datapath test/samenode test/crossnode test/runtime
KERNEL_RUN ?=
KERNEL_CI := bin/kernels/datapath.test:pkg/datapath:TestProbeFeatures|TestFeaturesCheck|TestFromUplinkDecap|TestFromPodEncap$$|TestFromPodLocalRedirect$$|TestTCAttach|TestAttachIdempotentAndDetach|TestNATCheck|TestNATVerdict|TestFromTunnel \
	bin/kernels/samenode.test:test/samenode:TestSameNode/chained-ptp/(ping|counters|spoofing) \
	bin/kernels/crossnode.test:test/crossnode:TestMesh$$|TestAgentKillRestart \
	bin/kernels/runtime.test:test/runtime:TestKillMidAdd/cnitool
test-kernels: deps tools build
	$(call install-missing,qemu-system-x86 busybox-static kmod)
	for p in $(KERNEL_TESTS); do $(GO) test -c -o $(BIN)/kernels/$$(basename $$p).test ./$$p || exit 1; done
	KERNELS="$(KERNELS)" $(if $(KERNEL_RUN),TESTS="$(KERNEL_RUN)") test/kernels/run.sh

demo: deps tools build
	$(GO) run ./test/demo

# Side-by-side benchmarks against the kernel's own datapaths; writes
# bench/results.json. BENCH_FLAGS=--quick for a smoke run.
bench: deps tools build
	$(GO) run ./bench $(BENCH_FLAGS)

clean:
	rm -rf $(BIN)
