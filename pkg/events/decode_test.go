package events

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/patchcord/patchcord/pkg/datapath"
)

// Statistic IDs by name, so the cases read like the datapath's enum.
func statID(tb testing.TB, name string) datapath.StatID {
	tb.Helper()
	i := slices.Index(datapath.StatNames(), name)
	if i < 0 {
		tb.Fatalf("no counter %q", name)
	}
	return datapath.StatID(i)
}

// be16 and ip4 store fields as the datapath does: in packet byte order,
// read natively.
func be16(v uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	return binary.NativeEndian.Uint16(b[:])
}

func ip4(s string) uint32 {
	b := netip.MustParseAddr(s).As4()
	return binary.NativeEndian.Uint32(b[:])
}

// raw is the record as the ring buffer hands it over.
func raw(tb testing.TB, ev datapath.Event) []byte {
	tb.Helper()
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, &ev); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

var (
	boot  = time.Date(2025, 1, 2, 15, 0, 0, 0, time.UTC)
	names = Resolver(func(ifindex int) string {
		return map[int]string{2: "eth0", 7: "pc1a2b3c4d5e", 9: "pc9f8e7d6c5b"}[ifindex]
	})
)

type decodeCase struct {
	name string
	ev   func(t *testing.T) datapath.Event
	want Decoded
	line string
}

// decodeCases are the cases of TestDecode.
func decodeCases() []decodeCase {
	const ts = 4*time.Second + 123456789
	return []decodeCase{
		{
			name: "spoofed icmp from a pod",
			ev: func(t *testing.T) datapath.Event {
				return datapath.Event{
					TsNs: uint64(ts), Ifindex: 7, Len: 98, Cpu: 3,
					Kind: datapath.EventDrop, Reason: statID(t, "drop_spoofed"), Prog: 1,
					Saddr: ip4("10.244.1.200"), Daddr: ip4("10.244.1.3"),
					EthProto: be16(0x0800), Proto: 1,
				}
			},
			want: Decoded{
				Time: boot.Add(ts), CPU: 3, Kind: "drop", Program: "from_pod",
				Ifindex: 7, Ifname: "pc1a2b3c4d5e", Reason: "drop_spoofed",
				Message: "source IP or MAC is not the pod's own", Len: 98,
				EthProto: "ipv4", Proto: "icmp", Src: "10.244.1.200", Dst: "10.244.1.3",
			},
			line: "15:00:04.123456 cpu 3 drop  from_pod pc1a2b3c4d5e: drop_spoofed (source IP or MAC is not the pod's own) icmp 10.244.1.200 -> 10.244.1.3 len 98",
		},
		{
			name: "unknown tunnel source on the uplink",
			ev: func(t *testing.T) datapath.Event {
				return datapath.Event{
					TsNs: uint64(ts), Ifindex: 2, Len: 148, Cpu: 0,
					Kind: datapath.EventDrop, Reason: statID(t, "drop_unknown_tunnel"), Prog: 2,
					Saddr: ip4("198.18.0.99"), Daddr: ip4("198.18.0.1"),
					Sport: be16(51234), Dport: be16(4789), EthProto: be16(0x0800), Proto: 17,
				}
			},
			want: Decoded{
				Time: boot.Add(ts), Kind: "drop", Program: "from_uplink",
				Ifindex: 2, Ifname: "eth0", Reason: "drop_unknown_tunnel",
				Message: "VXLAN from a source that is not a known node", Len: 148,
				EthProto: "ipv4", Proto: "udp", Src: "198.18.0.99", Dst: "198.18.0.1", Sport: 51234, Dport: 4789,
			},
			line: "15:00:04.123456 cpu 0 drop  from_uplink eth0: drop_unknown_tunnel (VXLAN from a source that is not a known node) udp 198.18.0.99:51234 -> 198.18.0.1:4789 len 148",
		},
		{
			name: "local redirect trace",
			ev: func(t *testing.T) datapath.Event {
				return datapath.Event{
					TsNs: uint64(ts), Ifindex: 7, Target: 9, Len: 74, Cpu: 1,
					Kind: datapath.EventTrace, Reason: statID(t, "local_redirect"), Prog: 1,
					Saddr: ip4("10.244.1.2"), Daddr: ip4("10.244.1.3"),
					Sport: be16(40000), Dport: be16(5201), EthProto: be16(0x0800), Proto: 6,
				}
			},
			want: Decoded{
				Time: boot.Add(ts), CPU: 1, Kind: "trace", Program: "from_pod",
				Ifindex: 7, Ifname: "pc1a2b3c4d5e", Reason: "local_redirect",
				Message: "redirected into a pod on this node", Target: 9, TargetIfname: "pc9f8e7d6c5b", Len: 74,
				EthProto: "ipv4", Proto: "tcp", Src: "10.244.1.2", Dst: "10.244.1.3", Sport: 40000, Dport: 5201,
			},
			line: "15:00:04.123456 cpu 1 trace from_pod pc1a2b3c4d5e -> pc9f8e7d6c5b: local_redirect (redirected into a pod on this node) tcp 10.244.1.2:40000 -> 10.244.1.3:5201 len 74",
		},
		{
			name: "spoofed arp on an interface that is gone",
			ev: func(t *testing.T) datapath.Event {
				return datapath.Event{
					TsNs: uint64(ts), Ifindex: 11, Len: 42,
					Kind: datapath.EventDrop, Reason: statID(t, "drop_spoofed"), Prog: 1,
					EthProto: be16(0x0806),
				}
			},
			want: Decoded{
				Time: boot.Add(ts), Kind: "drop", Program: "from_pod", Ifindex: 11,
				Reason: "drop_spoofed", Message: "source IP or MAC is not the pod's own", Len: 42, EthProto: "arp",
			},
			line: "15:00:04.123456 cpu 0 drop  from_pod ifindex 11: drop_spoofed (source IP or MAC is not the pod's own) arp len 42",
		},
		{
			name: "runt frame",
			ev: func(t *testing.T) datapath.Event {
				return datapath.Event{
					TsNs: uint64(ts), Ifindex: 7, Len: 10,
					Kind: datapath.EventDrop, Reason: statID(t, "drop_malformed"), Prog: 1,
				}
			},
			want: Decoded{
				Time: boot.Add(ts), Kind: "drop", Program: "from_pod", Ifindex: 7, Ifname: "pc1a2b3c4d5e",
				Reason: "drop_malformed", Message: "malformed packet", Len: 10,
			},
			line: "15:00:04.123456 cpu 0 drop  from_pod pc1a2b3c4d5e: drop_malformed (malformed packet) (no Ethernet header) len 10",
		},
		{
			name: "lldp and a reason from a newer datapath",
			ev: func(t *testing.T) datapath.Event {
				return datapath.Event{
					TsNs: uint64(ts), Ifindex: 2, Len: 60,
					Kind: datapath.EventDrop, Reason: 99, Prog: 2, EthProto: be16(0x88cc),
				}
			},
			want: Decoded{
				Time: boot.Add(ts), Kind: "drop", Program: "from_uplink", Ifindex: 2, Ifname: "eth0",
				Reason: "stat_99", Len: 60, EthProto: "0x88cc",
			},
			line: "15:00:04.123456 cpu 0 drop  from_uplink eth0: stat_99 0x88cc len 60",
		},
	}
}

func TestDecode(t *testing.T) {
	tests := decodeCases()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ev, err := Parse(raw(t, tt.ev(t)))
			if err != nil {
				t.Fatal(err)
			}
			dec := Decoder{Names: names, Boot: boot}
			got := dec.Decode(ev)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("decoded:\n got %+v\nwant %+v", got, tt.want)
			}
			if line := utc(got).String(); line != tt.line {
				t.Errorf("line:\n got %s\nwant %s", line, tt.line)
			}
		})
	}
}

// utc pins the time zone so that lines compare on any machine.
func utc(d Decoded) Decoded {
	d.Time = d.Time.UTC()
	return d
}

func TestParseShortRecord(t *testing.T) {
	if _, err := Parse(make([]byte, Size-1)); err == nil || !strings.Contains(err.Error(), "want 56") {
		t.Errorf("got %v, want an error naming the record size 56", err)
	}
}

// TestJSONShape pins the field names the README documents: scripts depend on
// them.
func TestJSONShape(t *testing.T) {
	d := Decoded{
		Time: boot, CPU: 1, Kind: "trace", Program: "from_pod", Ifindex: 7, Ifname: "pc1",
		Reason: "local_redirect", Message: "m", Target: 9, TargetIfname: "pc2", Len: 74,
		EthProto: "ipv4", Proto: "tcp", Src: "10.244.1.2", Dst: "10.244.1.3", Sport: 1, Dport: 2,
	}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	want := []string{"cpu", "dport", "dst", "ethProto", "ifindex", "ifname", "kind", "len", "message", "program",
		"proto", "reason", "sport", "src", "target", "targetIfname", "time"}
	if got := slices.Sorted(mapKeys(m)); !slices.Equal(got, want) {
		t.Errorf("JSON keys:\n got %v\nwant %v", got, want)
	}
	if m["time"] != "2025-01-02T15:00:00Z" {
		t.Errorf("time: got %v, want RFC 3339", m["time"])
	}

	// Absent, not empty, when unknown: a drop has no target, ARP no tuple.
	b, _ = json.Marshal(Decoded{Kind: "drop", Program: "from_pod", Reason: "drop_spoofed", EthProto: "arp"})
	clear(m)
	json.Unmarshal(b, &m)
	for _, k := range []string{"target", "targetIfname", "proto", "src", "dst", "sport", "dport", "ifname"} {
		if _, ok := m[k]; ok {
			t.Errorf("key %q present in %s", k, b)
		}
	}

	b, _ = json.Marshal(Lost{Lost: 12})
	if string(b) != `{"lost":12}` {
		t.Errorf("lost: got %s", b)
	}
	b, _ = json.Marshal(Suppressed{Suppressed: 40})
	if string(b) != `{"suppressed":40}` {
		t.Errorf("suppressed: got %s", b)
	}
	if got, want := (Suppressed{Suppressed: 40}).String(), "40 drop events suppressed (rate limit; the drops were counted: patchcord bpf stats)"; got != want {
		t.Errorf("suppressed text:\n got %q\nwant %q", got, want)
	}
}

func mapKeys(m map[string]any) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// TestDescribeEveryCounter keeps the words in step with the datapath's
// counters, which come from its BTF.
func TestDescribeEveryCounter(t *testing.T) {
	for _, name := range datapath.StatNames() {
		if Describe(name) == "" {
			t.Errorf("counter %q has no description in reasons.go", name)
		}
	}
}
