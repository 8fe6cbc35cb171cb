// Package events reads the datapath's ring buffer of drops and traces and
// decodes each record into a stable form for `patchcord monitor`: a JSON
// object with fixed field names, and one line of text.
package events

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/patchcord/patchcord/pkg/datapath"
)

// Kinds of events, as Decoded.Kind and `monitor --type` name them.
const (
	KindDrop  = "drop"
	KindTrace = "trace"
)

// Decoded is one event as `patchcord monitor -o json` prints it. The field
// names are part of the CLI's interface: add fields, never rename them.
type Decoded struct {
	// Time is when the datapath saw the packet (wall clock).
	Time time.Time `json:"time"`
	CPU  uint32    `json:"cpu"`
	// Kind is "drop" or "trace".
	Kind string `json:"kind"`
	// Program is the BPF program: "from_pod", "from_uplink", "to_uplink".
	Program string `json:"program"`
	// Ifindex and Ifname are where the packet was seen. Ifname is resolved
	// in the reader's network namespace and absent if no such interface
	// exists there (any more).
	Ifindex int    `json:"ifindex"`
	Ifname  string `json:"ifname,omitempty"`
	// Reason is the counter the packet went to ("drop_spoofed",
	// "local_redirect", ...), Message the same in words.
	Reason  string `json:"reason"`
	Message string `json:"message"`
	// Target is the interface a traced packet was sent to (0 for drops).
	Target       int    `json:"target,omitempty"`
	TargetIfname string `json:"targetIfname,omitempty"`
	// Len is the packet's length in bytes, Ethernet header included.
	Len uint32 `json:"len"`
	// EthProto is "ipv4", "arp", "ipv6" or the EtherType in hex ("0x88cc");
	// absent when the frame was too short to have one.
	EthProto string `json:"ethProto,omitempty"`
	// Proto, Src, Dst are set for IPv4: Proto is "icmp", "tcp", "udp" or
	// the protocol number in decimal. Sport and Dport are set for TCP and
	// UDP (first fragments only).
	Proto string `json:"proto,omitempty"`
	Src   string `json:"src,omitempty"`
	Dst   string `json:"dst,omitempty"`
	Sport uint16 `json:"sport,omitempty"`
	Dport uint16 `json:"dport,omitempty"`
}

// Lost is what `monitor -o json` prints when events were lost to a full ring
// buffer since the last report; the packets themselves were not.
type Lost struct {
	Lost uint64 `json:"lost"`
}

// Suppressed is what `monitor -o json` prints when the datapath's rate limit
// held drop events back since the last report; the drops were counted.
type Suppressed struct {
	Suppressed uint64 `json:"suppressed"`
}

// Size is the size of one ring-buffer record.
var Size = binary.Size(datapath.Event{})

// Parse turns a raw ring-buffer record into the datapath's event struct.
func Parse(raw []byte) (datapath.Event, error) {
	var ev datapath.Event
	if len(raw) < Size {
		return ev, fmt.Errorf("parse event: record of %d bytes, want %d", len(raw), Size)
	}
	if err := binary.Read(bytes.NewReader(raw[:Size]), binary.NativeEndian, &ev); err != nil {
		return ev, fmt.Errorf("parse event: %w", err)
	}
	return ev, nil
}

// Resolver names an interface by index, or returns "" when there is none.
type Resolver func(ifindex int) string

// Decoder turns events into Decoded. Its zero value decodes without names
// and with times counted from the Unix epoch.
type Decoder struct {
	// Names resolves interface names; nil leaves them empty.
	Names Resolver
	// Boot is the wall-clock time of the monotonic clock's zero, which the
	// datapath's timestamps count from (see MonotonicEpoch).
	Boot time.Time
}

// Decode describes ev in the stable form.
func (d *Decoder) Decode(ev datapath.Event) Decoded {
	out := Decoded{
		Time:    d.Boot.Add(time.Duration(ev.TsNs)),
		CPU:     ev.Cpu,
		Kind:    kindName(ev.Kind),
		Program: ev.Prog.String(),
		Ifindex: int(ev.Ifindex),
		Reason:  ev.Reason.String(),
		Target:  int(ev.Target),
		Len:     ev.Len,
	}
	out.Message = Describe(out.Reason)
	if d.Names != nil {
		out.Ifname = d.Names(out.Ifindex)
		if out.Target != 0 {
			out.TargetIfname = d.Names(out.Target)
		}
	}
	ethProto := ntohs(ev.EthProto)
	switch ethProto {
	case 0:
		// The frame had no complete Ethernet header.
	case 0x0800:
		out.EthProto = "ipv4"
	case 0x0806:
		out.EthProto = "arp"
	case 0x86dd:
		out.EthProto = "ipv6"
	default:
		out.EthProto = fmt.Sprintf("0x%04x", ethProto)
	}
	if ethProto == 0x0800 && (ev.Saddr != 0 || ev.Daddr != 0 || ev.Proto != 0) {
		out.Proto = protoName(ev.Proto)
		out.Src = addr(ev.Saddr).String()
		out.Dst = addr(ev.Daddr).String()
		out.Sport = ntohs(ev.Sport)
		out.Dport = ntohs(ev.Dport)
	}
	return out
}

func kindName(k datapath.EventKind) string {
	switch k {
	case datapath.EventDrop:
		return KindDrop
	case datapath.EventTrace:
		return KindTrace
	}
	return "kind_" + strconv.Itoa(int(k))
}

func protoName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	}
	return strconv.Itoa(int(p))
}

// addr reads an address the datapath keeps in packet byte order.
func addr(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// ntohs reads a 16-bit field the datapath copied from the packet as is.
func ntohs(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

// String is the text line `patchcord monitor` prints, e.g.
//
//	15:04:05.123456 cpu 2 drop  from_pod pc1a2b3c4d5e: drop_spoofed (source IP or MAC is not the pod's own) icmp 10.244.1.200 -> 10.244.1.3 len 98
func (d Decoded) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s cpu %d %-5s %s %s", d.Time.Format("15:04:05.000000"), d.CPU, d.Kind, d.Program, ifaceName(d.Ifname, d.Ifindex))
	if d.Target != 0 {
		fmt.Fprintf(&b, " -> %s", ifaceName(d.TargetIfname, d.Target))
	}
	fmt.Fprintf(&b, ": %s", d.Reason)
	if d.Message != "" {
		fmt.Fprintf(&b, " (%s)", d.Message)
	}
	switch {
	case d.Src != "" && (d.Sport != 0 || d.Dport != 0):
		fmt.Fprintf(&b, " %s %s:%d -> %s:%d", d.Proto, d.Src, d.Sport, d.Dst, d.Dport)
	case d.Src != "":
		fmt.Fprintf(&b, " %s %s -> %s", d.Proto, d.Src, d.Dst)
	case d.EthProto != "":
		b.WriteString(" " + d.EthProto)
	default:
		b.WriteString(" (no Ethernet header)")
	}
	fmt.Fprintf(&b, " len %d", d.Len)
	return b.String()
}

func ifaceName(name string, ifindex int) string {
	if name != "" {
		return name
	}
	return fmt.Sprintf("ifindex %d", ifindex)
}

// String is the text line for lost events.
func (l Lost) String() string {
	return fmt.Sprintf("%d events lost (ring buffer full; the packets were not)", l.Lost)
}

// String is the text line for suppressed events.
func (s Suppressed) String() string {
	return fmt.Sprintf("%d drop events suppressed (rate limit; the drops were counted: patchcord bpf stats)", s.Suppressed)
}
