// Endpoint and node rows: sorted, and the JSON keys scripts rely on.
package views

import (
	"encoding/json"
	"net"
	"net/netip"
	"testing"

	"github.com/patchcord/patchcord/pkg/bpfmaps"
)

func TestEndpointRows(t *testing.T) {
	mac := net.HardwareAddr{2, 0, 0x0a, 0xf4, 1, 5}
	list := []bpfmaps.EndpointInfo{
		{IP: netip.MustParseAddr("10.244.1.9"), Ifindex: 9, Ifname: "pc9", MAC: mac, HostMAC: mac},
		{IP: netip.MustParseAddr("10.244.1.10"), Ifindex: 10, Ifname: "pc10", MAC: mac, HostMAC: mac, Container: "abc", HostPath: true},
	}
	rows := EndpointRows(list)
	if len(rows) != 2 || rows[0].IP != "10.244.1.9" || rows[1].IP != "10.244.1.10" {
		t.Fatalf("rows not sorted by address: %+v", rows)
	}
	if list[0].IP.String() != "10.244.1.9" {
		t.Errorf("EndpointRows reordered its argument")
	}
	b, err := json.Marshal(rows[1])
	if err != nil {
		t.Fatal(err)
	}
	want := `{"ip":"10.244.1.10","ifindex":10,"ifname":"pc10","mac":"02:00:0a:f4:01:05","hostMac":"02:00:0a:f4:01:05","containerID":"abc","hostPath":true}`
	if string(b) != want {
		t.Errorf("JSON:\n got %s\nwant %s", b, want)
	}
}

func TestNodeRows(t *testing.T) {
	list := []bpfmaps.Node{
		{PodCIDR: netip.MustParsePrefix("10.244.3.0/24"), NodeIP: netip.MustParseAddr("198.18.0.3"), Native: true},
		{PodCIDR: netip.MustParsePrefix("10.244.2.0/24"), NodeIP: netip.MustParseAddr("198.18.0.2"), VtepMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}},
	}
	b, err := json.Marshal(NodeRows(list))
	if err != nil {
		t.Fatal(err)
	}
	want := `[{"podCIDR":"10.244.2.0/24","nodeIP":"198.18.0.2","vtepMAC":"02:00:00:00:00:02","routing":"tunnel"},{"podCIDR":"10.244.3.0/24","nodeIP":"198.18.0.3","routing":"native"}]`
	if string(b) != want {
		t.Errorf("JSON:\n got %s\nwant %s", b, want)
	}
}
