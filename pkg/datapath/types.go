package datapath

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"sync"

	"github.com/cilium/ebpf/btf"
)

// Public names for the structs bpf/lib/types.h declares.
type (
	Endpoint     = fromPodEndpoint
	EndpointMeta = fromPodEndpointMeta
	LPMKey       = fromPodLpmV4Key
	NodeInfo     = fromPodNodeInfo
	NodeConfig   = fromPodNodeConfig
	StatCounter  = fromPodStatCounter
	Event        = fromPodEvent
	StatID       = fromPodStatId
	EventKind    = fromPodEventKind
	ProgID       = fromPodProgId
)

const (
	ConfigTrace        = fromPodConfigFlagsCFG_TRACE
	ConfigNative       = fromPodConfigFlagsCFG_NATIVE
	ConfigPodUplinkMTU = fromPodConfigFlagsCFG_POD_UPLINK_MTU
	NodeNative         = fromPodNodeFlagsNODE_NATIVE
	EndpointHostPath   = fromPodEndpointFlagsEP_HOST_PATH

	EventDrop  = fromPodEventKindEVENT_DROP
	EventTrace = fromPodEventKindEVENT_TRACE

	// What the datapath uses where the config's event rate or burst is
	// zero: drop events per second, per CPU and reason, and the burst.
	EventRateDefault  = uint32(fromPodEventLimitDefaultsEVENT_RATE_DEFAULT)
	EventBurstDefault = uint32(fromPodEventLimitDefaultsEVENT_BURST_DEFAULT)
)

// VXLANOverhead is what encapsulation adds in front of a pod's frame: outer
// IPv4, UDP, VXLAN and inner Ethernet, as bpf/lib/vxlan.h computes it
// (enum vxlan_layout). Pods get the uplink MTU minus this.
const VXLANOverhead = int(fromPodVxlanLayoutVXLAN_LAYOUT_OVERHEAD)

// Program names, as in the C sources and under <root>/progs, for the
// callers that attach a particular one; Programs lists them all, from the ELF.
const (
	FromPod    = "from_pod"
	FromUplink = "from_uplink"
	ToUplink   = "to_uplink"
	// FromTunnel is attached to the agent's GRO device (pkg/agent).
	FromTunnel = "from_tunnel"
)

// enumValues reads the constants of a C enum from the datapath's own BTF,
// so that C stays the one place they are written.
func enumValues(name string) ([]btf.EnumValue, error) {
	spec, err := loadFromPod()
	if err != nil {
		return nil, err
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName(name, &enum); err != nil {
		return nil, fmt.Errorf("find enum %s: %w", name, err)
	}
	return enum.Values, nil
}

var statNames = sync.OnceValues(func() ([]string, error) {
	values, err := enumValues("stat_id")
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(values))
	for _, v := range values {
		if v.Name == "STAT_MAX" {
			continue
		}
		if int(v.Value) != len(names) {
			return nil, fmt.Errorf("enum stat_id is not dense at %s", v.Name)
		}
		names = append(names, strings.ToLower(strings.TrimPrefix(v.Name, "STAT_")))
	}
	return names, nil
})

// StatNames lists the counter names by stat ID ("local_redirect",
// "drop_spoofed", ...), read from the datapath's own BTF so that C stays the
// one place they are written.
func StatNames() []string { return embedded(statNames()) }

var podGateway = sync.OnceValues(func() (netip.Addr, error) {
	spec, err := loadFromPod()
	if err != nil {
		return netip.Addr{}, err
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("pod_gateway", &enum); err != nil {
		return netip.Addr{}, fmt.Errorf("find enum pod_gateway: %w", err)
	}
	for _, v := range enum.Values {
		if v.Name == "POD_GATEWAY_IP" && v.Value <= math.MaxUint32 {
			return netip.AddrFrom4([4]byte{byte(v.Value >> 24), byte(v.Value >> 16), byte(v.Value >> 8), byte(v.Value)}), nil
		}
	}
	return netip.Addr{}, errors.New("enum pod_gateway has no 32-bit POD_GATEWAY_IP")
})

// PodGateway is the link-local gateway every pod routes through, whose ARP
// from_pod answers (169.254.1.1). It is read from the datapath's own BTF
// (POD_GATEWAY_IP in bpf/lib/types.h), so that C stays the one place it is
// written.
func PodGateway() netip.Addr {
	gw, err := podGateway()
	if err != nil {
		// The object is embedded in this binary: a failure is a build bug.
		panic(err)
	}
	return gw
}

// String returns the counter name, e.g. "drop_spoofed".
func (s StatID) String() string {
	names := StatNames()
	if int(s) < len(names) {
		return names[s]
	}
	return fmt.Sprintf("stat_%d", uint32(s))
}

var progIDNames = sync.OnceValues(func() (map[ProgID]string, error) {
	values, err := enumValues("prog_id")
	if err != nil {
		return nil, err
	}
	names := make(map[ProgID]string, len(values))
	for _, v := range values {
		names[ProgID(v.Value)] = progIDName(v.Name)
	}
	return names, nil
})

// String returns the program's name, e.g. "from_pod", read from enum prog_id.
func (p ProgID) String() string {
	if name, ok := embedded(progIDNames())[p]; ok {
		return name
	}
	return fmt.Sprintf("prog_%d", uint32(p))
}
