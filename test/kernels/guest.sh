#!/bin/sh
# Runs inside the kernel-matrix guest (chroot of the host root): the rest of the kernel setup,
# then each test binary, its output and exit status written to the results share ($1).
res=$1
. "$res/guest.env"
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ip link set lo up
# The initramfs passes PATH=/bin; tests run host tools from sbin (conntrack, ip, tc).
export PATH="$res/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The host root is read-only here: go (the lab builds the sandbox image's binary) needs
# a writable home and build cache.
export HOME=/tmp/home GOCACHE=/tmp/go-build
mkdir -p "$HOME"
for m in $GUEST_MODULES; do modprobe "$m" || echo "modprobe $m failed" >>"$res/modules.err"; done
for spec in $TESTS; do
	t=${spec%%:*} pkg=${spec#*:} run=
	case $pkg in *:*) run=${pkg#*:} pkg=${pkg%%:*} ;; esac
	n=$(basename "$t")
	start=$(cut -d. -f1 /proc/uptime)
	# A test binary runs in its package directory, as go test does, for its testdata.
	(cd "$REPO/$pkg" && "$REPO/$t" -test.v -test.count=1 ${run:+-test.run "$run"} $TESTFLAGS >"$res/$n.out" 2>&1)
	echo $? >"$res/$n.rc"
	echo $(($(cut -d. -f1 /proc/uptime) - start)) >"$res/$n.secs"
done
lsmod >"$res/lsmod"
