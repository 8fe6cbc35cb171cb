#!/bin/busybox sh
# /init of the kernel-matrix initramfs: loads the 9p modules, mounts the host root read-only and
# the results share, then runs guest.sh from the repo in a chroot of the host root.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc 2>/dev/null || { mkdir -p /proc && mount -t proc proc /proc; }
mkdir -p /sys /dev /host /results
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for ko in $(cat /mod/order); do insmod "/mod/$ko" || echo "insmod $ko failed"; done
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro" hostroot /host || { echo "mount host root failed"; poweroff -f; }
mount -t 9p -o "$opts" results /results || { echo "mount results failed"; poweroff -f; }
cut -d' ' -f1 /proc/uptime >/results/boot.secs
. /results/guest.env
for d in proc sys dev; do mount --rbind "/$d" "/host/$d"; done
# The repo (a CI clone may live in /tmp) and the kernel's modules must stay visible through
# the tmpfs mounts below: bound aside first, bound back after.
keep() {
	case $1 in /tmp/* | /run/* | /var/lib/*) mkdir -p "/keep$1" && mount --bind "/host$1" "/keep$1" ;; esac
}
restore() {
	[ ! -d "/keep$1" ] || { mkdir -p "/host$1" && mount --bind "/keep$1" "/host$1"; }
}
keep "$REPO"
keep "$MODROOT"
mount -t tmpfs tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
# Tools keep state there (cnitool's result cache in /var/lib/cni); the host's stays untouched.
mount -t tmpfs tmpfs /host/var/lib
restore "$REPO"
restore "$MODROOT"
mkdir -p /host/tmp/results && mount --bind /results /host/tmp/results
[ ! -d /host/lib/modules ] || mount --bind "$MODROOT/lib/modules" /host/lib/modules
# The kernel runs kernel.modprobe from this root, not the chroot's: this one runs the host's
# modprobe on the guest kernel's modules, so that sockets and rules load theirs on demand
# (NETLINK_XFRM, nfnetlink, xt_*, qdiscs), as on a real machine.
printf '#!/bin/sh\nexec chroot /host /sbin/modprobe -d %s "$@"\n' "$MODROOT" >/modprobe
chmod +x /modprobe && echo /modprobe >/proc/sys/kernel/modprobe
chroot /host /bin/sh "$REPO/test/kernels/guest.sh" /tmp/results
sync
poweroff -f
