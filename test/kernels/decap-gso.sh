#!/bin/sh
# What from_uplink's decap leaves on the packets that reach a pod's TCP, on the running kernel:
# skb->encapsulation and the GSO type and size of every packet larger than the uplink MTU, while
# bulk TCP crosses two lab nodes (crossnode's TestMesh/tcp, > 100 MB in a second). Answers, per
# kernel, whether bpf_skb_adjust_room's decap keeps GSO packets whole and what it leaves of the
# tunnel. Run it in the kernel matrix (TESTS="test/kernels/decap-gso.sh:test/crossnode") or as
# root on a host; needs bpftrace and bin/kernels/crossnode.test (make test-kernels builds it).
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
command -v bpftrace >/dev/null || { echo "decap-gso: bpftrace not found: apt-get install bpftrace"; exit 2; }
out=$(mktemp)
# gso_type bits (include/linux/skbuff.h): 0x1 SKB_GSO_TCPV4, 0x2 SKB_GSO_DODGY, 0x400 SKB_GSO_UDP_TUNNEL.
bpftrace -e '
BEGIN { printf("ready\n"); }
kprobe:tcp_v4_rcv /((struct sk_buff *)arg0)->len > 1500/ {
	$skb = (struct sk_buff *)arg0;
	$sh = (struct skb_shared_info *)($skb->head + $skb->end);
	@packets[$skb->encapsulation, $sh->gso_type, $sh->gso_size] = count();
	@bytes[$skb->encapsulation, $sh->gso_type, $sh->gso_size] = sum($skb->len);
}' >"$out" 2>&1 &
bt=$!
i=0
until grep -q ready "$out"; do
	kill -0 "$bt" 2>/dev/null || { cat "$out"; exit 2; }
	i=$((i + 1)) && [ "$i" -lt 600 ] || { echo "decap-gso: bpftrace did not attach"; cat "$out"; exit 2; }
	sleep 1
done
(cd "$REPO/test/crossnode" && "$REPO/bin/kernels/crossnode.test" -test.v -test.count=1 -test.run 'TestMesh$/tcp')
rc=$?
kill -INT "$bt" && wait "$bt"
echo "== packets > 1500 bytes at tcp_v4_rcv: [skb->encapsulation, gso_type, gso_size]: count / bytes"
grep -v ready "$out"
rm -f "$out"
exit $rc
