package events

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/internal/packet"
	"github.com/patchcord/patchcord/pkg/bpfmaps"
	"github.com/patchcord/patchcord/pkg/datapath"
	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

// BPF_PROG_RUN runs tc programs on the loopback device of the test's
// network namespace: the pod that sends is registered on ifindex 1.
const loIfindex = 1

var (
	podIP   = netip.MustParseAddr("10.244.1.5")
	podMAC  = net.HardwareAddr{0x02, 0, 0x0a, 0xf4, 0x01, 0x05}
	hostMAC = net.HardwareAddr{0xee, 0xee, 0, 0, 0, 0x01}
)

// udpFrame is an Ethernet/IPv4/UDP frame with a correct header checksum.
func udpFrame(src, dst netip.Addr, sport, dport uint16) []byte {
	return packet.UDP(hostMAC, podMAC, src, dst, sport, dport, []byte("patchcord"))
}

func mustRunFromPod(tb testing.TB, d *datapath.Datapath, frame []byte) {
	tb.Helper()
	p, err := d.Program(datapath.FromPod)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := p.Run(&ebpf.RunOptions{Data: frame}); err != nil {
		tb.Fatalf("run from_pod: %v", err)
	}
}

// TestReaderDecodesADrop runs a spoofed packet through the real from_pod and
// reads the drop back through Reader and Decoder, as monitor does.
func TestReaderDecodesADrop(t *testing.T) {
	d := datapathtest.MustOpen(t)
	err := bpfmaps.NewEndpoints(&d.Maps).Put(bpfmaps.EndpointInfo{IP: podIP, Ifindex: loIfindex, MAC: podMAC, HostMAC: hostMAC})
	if err != nil {
		t.Fatal(err)
	}
	spoofed := netip.MustParseAddr("10.244.1.200")
	other := netip.MustParseAddr("10.244.1.6")

	// Queued before the reader opens: a monitor must not show it.
	mustRunFromPod(t, d, udpFrame(spoofed, other, 1111, 2222))

	rd, err := NewReader(d.Maps.Events)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	mustRunFromPod(t, d, udpFrame(spoofed, other, 40000, 53))

	rd.SetDeadline(time.Now().Add(5 * time.Second))
	ev, err := rd.Read()
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	boot, err := MonotonicEpoch()
	if err != nil {
		t.Fatal(err)
	}
	got := (&Decoder{Names: (&Names{}).Name, Boot: boot}).Decode(ev)
	if age := time.Since(got.Time); age < -time.Second || age > 10*time.Second {
		t.Errorf("event time %s is %s from now", got.Time, age)
	}
	got.Time = time.Time{}
	want := Decoded{
		CPU: got.CPU, Kind: "drop", Program: "from_pod", Ifindex: loIfindex, Ifname: "lo",
		Reason: "drop_spoofed", Message: "source IP or MAC is not the pod's own", Len: 51,
		EthProto: "ipv4", Proto: "udp", Src: "10.244.1.200", Dst: "10.244.1.6", Sport: 40000, Dport: 53,
	}
	if got != want {
		t.Errorf("decoded:\n got %+v\nwant %+v", got, want)
	}

	// Nothing else: the older drop was skipped.
	rd.SetDeadline(time.Now().Add(50 * time.Millisecond))
	if ev, err := rd.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("second read: got %+v, %v; want a deadline error", ev, err)
	}

	// Close interrupts a blocked Read.
	rd.SetDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() { _, err := rd.Read(); errc <- err }()
	rd.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Errorf("read after close: got %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not interrupt Read")
	}
}
