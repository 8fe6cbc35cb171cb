#!/bin/sh
# Kernel matrix: boots each Debian kernel in KERNELS under qemu TCG with the host root shared
# read-only over 9p and runs the host-compiled test binaries in TESTS inside it, so the datapath
# is tested on the kernels operators run, not only on this machine's.
# Usage: KERNELS="debian12 debian11" TESTS="bin/kernels/datapath.test:pkg/datapath" test/kernels/run.sh
# (each test is BINARY:PACKAGE_DIR[:RUN], paths relative to the repo; the binary runs in its
# package dir, RUN is its -test.run). Exits 1 when a guest test fails, 2 when the matrix cannot run.
set -eu

KERNELS=${KERNELS:-debian12}
TESTS=${TESTS:-"bin/kernels/datapath.test:pkg/datapath bin/kernels/samenode.test:test/samenode
bin/kernels/crossnode.test:test/crossnode bin/kernels/runtime.test:test/runtime:TestKillMidAdd/cnitool"}
# TCG speed varies with the host CPU: CI's pick took 465-600 s on one machine and
# 874 s on another, where 15 minutes cut off a run whose tests all passed.
VM_TIMEOUT=${VM_TIMEOUT:-25m}
# Extra flags for every test binary, e.g. TESTFLAGS="-test.run TestFromUplink".
TESTFLAGS=${TESTFLAGS:-}
# Loaded by modprobe inside the guest once /lib/modules is mounted: what the tests' topologies use.
GUEST_MODULES=${GUEST_MODULES:-"veth vxlan bridge sch_ingress cls_bpf nf_conntrack nf_conntrack_netlink nf_nat"}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/patchcord/kernels
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# What the lab tests exec (the Makefile exports these).
PATCHCORD_BIN=${PATCHCORD_BIN:-$REPO/bin}
CNI_PLUGINS=${CNI_PLUGINS:-$PATCHCORD_BIN/cni}
CNITOOL=${CNITOOL:-$PATCHCORD_BIN/tools/cnitool}
CRICTL=${CRICTL:-$PATCHCORD_BIN/tools/crictl}
# Emulation is 10-30 times slower than the host: the lab tests' own bound (3 minutes a test).
PATCHCORD_E2E_TIMEOUT=${PATCHCORD_E2E_TIMEOUT:-12m}
# Needed in the initramfs to reach the 9p shares; order is resolved from modules.dep.
BOOT_MODULES="virtio_pci 9pnet_virtio 9p"

die() { echo "test-kernels: $*" >&2; exit 2; }

need() {
	command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install $2"
}

# fetch_deb NAME APTOPTS...: downloads the newest linux-image-NN-amd64 behind metapackage NAME once.
fetch_deb() {
	dir=$1 meta=$2; shift 2
	mkdir -p "$dir"
	if ! ls "$dir"/linux-image-*.deb >/dev/null 2>&1; then
		pkg=$(apt-cache "$@" depends "$meta" | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -1)
		[ -n "$pkg" ] || die "no kernel package behind $meta (apt-get update?)"
		(cd "$dir" && apt-get "$@" download "$pkg" 2>&1 | grep -v unsandboxed) || die "download $pkg failed"
	fi
	if [ ! -d "$dir/root" ]; then
		dpkg-deb -x "$dir"/linux-image-*.deb "$dir/root.tmp" && mv "$dir/root.tmp" "$dir/root"
		depmod -b "$dir/root" "$(ls "$dir/root/lib/modules")"
	fi
}

# bullseye_apt: a private apt configuration for Debian 11; the machine's own sources are untouched.
bullseye_apt() {
	a=$CACHE/apt-bullseye
	mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
	cat >"$a/sources.list" <<-SRC
	deb http://deb.debian.org/debian bullseye main
	deb http://deb.debian.org/debian-security bullseye-security main
	SRC
	set -- -o Dir::Etc::SourceList="$a/sources.list" -o Dir::Etc::SourceParts=/dev/null \
		-o Dir::State::Lists="$a/lists" -o Dir::Cache="$a/cache" \
		-o Dir::State::Status=/dev/null -o APT::Architecture=amd64
	[ -n "$(ls "$a/lists" 2>/dev/null | grep -v partial)" ] || apt-get "$@" update >/dev/null || die "bullseye apt update failed"
	echo "$@"
}

fetch_kernel() {
	case $1 in
	debian12) fetch_deb "$CACHE/debian12" linux-image-amd64 ;;
	debian11) fetch_deb "$CACHE/debian11" linux-image-amd64 $(bullseye_apt) ;;
	*) die "unknown kernel $1 (known: debian12 debian11)" ;;
	esac
}

# build_initramfs ROOT OUT: busybox, the boot modules in dependency order, and guest-init.sh as /init.
build_initramfs() {
	root=$1 out=$2 ver=$(ls "$1/lib/modules") stage=$WORK/initramfs
	rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/mod"
	cp "$(command -v busybox)" "$stage/bin/busybox"
	cp "$HERE/guest-init.sh" "$stage/init"
	: >"$stage/mod/order"
	for m in $BOOT_MODULES; do
		for ko in $(modprobe -d "$root" -S "$ver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'); do
			grep -qx "$(basename "$ko")" "$stage/mod/order" && continue
			cp "$ko" "$stage/mod/" && basename "$ko" >>"$stage/mod/order"
		done
	done
	(cd "$stage" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$out"
}

# run_vm NAME: boots kernel NAME with the results share; prints its results; returns non-zero on failure.
run_vm() {
	name=$1 root=$CACHE/$1/root ver=$(ls "$CACHE/$1/root/lib/modules") res=$WORK/$1
	mkdir -p "$res"
	build_initramfs "$root" "$WORK/$name.cpio.gz"
	cat >"$res/guest.env" <<-ENV
	REPO='$REPO'
	MODROOT='$root'
	TESTS='$TESTS'
	TESTFLAGS='$TESTFLAGS'
	GUEST_MODULES='$GUEST_MODULES'
	export PATCHCORD_BIN='$PATCHCORD_BIN' CNI_PLUGINS='$CNI_PLUGINS' CNITOOL='$CNITOOL' CRICTL='$CRICTL' PATCHCORD_E2E_TIMEOUT='$PATCHCORD_E2E_TIMEOUT'
	ENV
	# The host root may have no /lib/modules to mount over: the guest's modprobe (and the
	# kernel's own, kernel.modprobe, see guest-init.sh) reads the unpacked tree through -d.
	mkdir -p "$res/bin"
	printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$root" >"$res/bin/modprobe"
	chmod +x "$res/bin/modprobe"
	start=$(date +%s)
	rc=0
	timeout "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -m 2G -smp 2 -nographic -no-reboot \
		-kernel "$root/boot/vmlinuz-$ver" -initrd "$WORK/$name.cpio.gz" \
		-append "console=ttyS0 panic=-1 quiet" \
		-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
		-virtfs local,path="$res",mount_tag=results,security_model=none \
		>"$res/console.log" 2>&1 </dev/null || rc=$?
	secs=$(($(date +%s) - start))
	[ "$rc" = 124 ] && echo "== $name ($ver): timed out after $VM_TIMEOUT" && return 1
	report "$name" "$ver" "$res" "$secs"
}

# report NAME VER DIR SECS: each test's exit status from the guest, its output when it failed.
report() {
	failed=0
	echo "== $1 ($2): vm ${4}s, boot $(cat "$3/boot.secs" 2>/dev/null || echo '?')s"
	for t in $TESTS; do
		n=$(basename "${t%%:*}")
		st=$(cat "$3/$n.rc" 2>/dev/null || echo missing)
		echo "   $n: exit $st, $(cat "$3/$n.secs" 2>/dev/null || echo '?')s"
		[ "$st" = 0 ] && continue
		failed=1
		if [ -f "$3/$n.out" ]; then
			grep -E '^(--- FAIL|FAIL|panic)|_test\.go:[0-9]+:' "$3/$n.out" | sed 's/^/     /'
		else
			tail -30 "$3/console.log" | sed 's/^/     console: /'
		fi
	done
	[ "$failed" = 0 ]
}

need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need modprobe kmod
need depmod kmod
need dpkg-deb dpkg
[ -e /dev/kvm ] || echo "test-kernels: no /dev/kvm; fine, the VMs use TCG" >&2
busybox cpio --help >/dev/null 2>&1 || die "busybox lacks cpio: apt-get install busybox-static"
for t in $TESTS; do [ -x "$REPO/${t%%:*}" ] || die "$t not built (make test-kernels builds it)"; done

# Under bin/, not /tmp: the guest must see it through the host-root share, and /tmp may be a tmpfs.
mkdir -p "$REPO/bin/kernels"
WORK=$(mktemp -d "$REPO/bin/kernels/run.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT INT TERM

status=0
for k in $KERNELS; do fetch_kernel "$k"; done
for k in $KERNELS; do run_vm "$k" || status=1; done
[ -z "${KEEP:-}" ] || echo "test-kernels: results kept in $WORK"
exit $status
