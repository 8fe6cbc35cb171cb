package main

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/patchcord/patchcord/internal/kubeproxy"
	"github.com/patchcord/patchcord/internal/lab"
)

// kubeProxyServices is how many services --kube-proxy writes rules for: a
// small cluster's worth, each with two endpoints that no bench pod is, so
// that the rules cost what they cost every packet without taking any.
const kubeProxyServices = 50

// benchServices are the services of --kube-proxy: ClusterIPs in
// 10.96.1.0/24, endpoints in 10.244.250.0/24 (no node's pod CIDR).
func benchServices() []kubeproxy.ServicePort {
	var svcs []kubeproxy.ServicePort
	for i := range kubeProxyServices {
		ep := func(j int) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 244, 250, byte(2*i + j + 1)}), 8080)
		}
		svcs = append(svcs, kubeproxy.ServicePort{
			Namespace: "bench", Name: fmt.Sprintf("svc%d", i), PortName: "http", Protocol: "tcp",
			ClusterIP: netip.AddrFrom4([4]byte{10, 96, 1, byte(i + 1)}), Port: 80, NodePort: 30000 + i,
			Endpoints: []netip.AddrPort{ep(0), ep(1)},
		})
	}
	return svcs
}

// loadKubeProxy gives every node of the cross-node subjects kube-proxy's
// rules, once each.
func loadKubeProxy(ctx context.Context, subjects []*subject) error {
	svcs := benchServices()
	done := map[*lab.Node]bool{}
	for _, s := range subjects {
		for _, n := range s.uplinks {
			if done[n] {
				continue
			}
			done[n] = true
			if err := kubeproxy.Load(ctx, n, netip.MustParsePrefix("10.244.0.0/16"), svcs); err != nil {
				return fmt.Errorf("%s: %w", s.Name, err)
			}
		}
	}
	return nil
}
