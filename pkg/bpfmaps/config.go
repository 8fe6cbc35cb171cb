package bpfmaps

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/patchcord/patchcord/pkg/datapath"
)

// Config is the node-wide setting the agent writes and the CNI plugin reads.
type Config struct {
	NodeIP        netip.Addr
	UplinkIfindex int
	UplinkMAC     net.HardwareAddr
	VXLANPort     uint16
	VNI           uint32
	// TunnelMTU is the longest packet the tunnel carries: the uplink's
	// MTU less VXLAN's headers. Use PodMTU for the pods'.
	TunnelMTU int
	// PodUplinkMTU: pods get the uplink's whole MTU, since the agent
	// routes every node natively.
	PodUplinkMTU bool
	Trace        bool
	// Native: some remote node is reached by routing, so from_uplink
	// looks for routed packets to local pods.
	Native bool
	// EventRate and EventBurst limit drop events per CPU and per drop
	// reason (events per second, and how many at once); 0 leaves the
	// datapath's defaults (datapath.EventRateDefault, EventBurstDefault).
	// Drops are counted either way.
	EventRate  uint32
	EventBurst uint32
}

// PodMTU is the MTU the agent means pods to have; 0 if it has not said.
func (c Config) PodMTU() int {
	if c.PodUplinkMTU && c.TunnelMTU != 0 {
		return c.TunnelMTU + datapath.VXLANOverhead
	}
	return c.TunnelMTU
}

// Configured reports whether an agent has set up the uplink.
func (c Config) Configured() bool { return c.UplinkIfindex != 0 }

// ConfigMap is the one-entry config array.
type ConfigMap struct{ m *ebpf.Map }

func NewConfig(m *datapath.Maps) *ConfigMap { return &ConfigMap{m: m.Config} }

func (c *ConfigMap) Get() (Config, error) {
	var v datapath.NodeConfig
	if err := c.m.Lookup(uint32(0), &v); err != nil {
		return Config{}, fmt.Errorf("read node config: %w", err)
	}
	cfg := Config{
		UplinkIfindex: int(v.UplinkIfindex),
		VXLANPort:     v.VxlanPort,
		VNI:           v.Vni,
		TunnelMTU:     int(v.Mtu),
		PodUplinkMTU:  v.Flags&datapath.ConfigPodUplinkMTU != 0,
		Trace:         v.Flags&datapath.ConfigTrace != 0,
		Native:        v.Flags&datapath.ConfigNative != 0,
		EventRate:     v.EventRate,
		EventBurst:    v.EventBurst,
	}
	if v.NodeIp != 0 {
		cfg.NodeIP = addr(v.NodeIp)
	}
	if v.UplinkMac != [6]uint8{} {
		cfg.UplinkMAC = hw(v.UplinkMac)
	}
	return cfg, nil
}

func (c *ConfigMap) Put(cfg Config) error {
	v := datapath.NodeConfig{
		UplinkIfindex: uint32(cfg.UplinkIfindex),
		VxlanPort:     cfg.VXLANPort,
		Vni:           cfg.VNI,
		Mtu:           uint32(cfg.TunnelMTU),
		EventRate:     cfg.EventRate,
		EventBurst:    cfg.EventBurst,
	}
	if cfg.NodeIP.IsValid() {
		if !cfg.NodeIP.Is4() {
			return fmt.Errorf("node IP %s: only IPv4 is supported", cfg.NodeIP)
		}
		v.NodeIp = u32(cfg.NodeIP)
	}
	if cfg.UplinkMAC != nil {
		m, err := mac6(cfg.UplinkMAC)
		if err != nil {
			return fmt.Errorf("uplink %w", err)
		}
		v.UplinkMac = m
	}
	if cfg.Trace {
		v.Flags |= datapath.ConfigTrace
	}
	if cfg.PodUplinkMTU {
		v.Flags |= datapath.ConfigPodUplinkMTU
	}
	if cfg.Native {
		v.Flags |= datapath.ConfigNative
	}
	if err := c.m.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("write node config: %w", err)
	}
	return nil
}
