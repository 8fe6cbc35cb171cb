// Package datapath loads patchcord's TC programs, pins them and their maps
// under a bpffs root, and attaches them with tcx so that the datapath
// outlives every process that set it up.
package datapath

// One object per hook. from_pod carries the shared types (-type); the other
// others reuse them (-no-global-types) so each C struct has exactly one Go type.
// -idirafter adds the multiarch UAPI directories clang's bpf target skips.
//go:generate go tool bpf2go -tags linux -target bpfel -type endpoint -type endpoint_flags -type endpoint_meta -type lpm_v4_key -type node_info -type node_flags -type node_config -type stat_id -type stat_counter -type event -type event_kind -type prog_id -type config_flags -type event_limit_defaults -type vxlan_layout fromPod ../../bpf/from_pod.c -- -DBTF_EXPORTS -I../../bpf -I../../bpf/third_party/libbpf -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu -Wall -Werror -O2 -g
//go:generate go tool bpf2go -tags linux -target bpfel -no-global-types fromUplink ../../bpf/from_uplink.c -- -I../../bpf -I../../bpf/third_party/libbpf -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu -Wall -Werror -O2 -g
//go:generate go tool bpf2go -tags linux -target bpfel -no-global-types toUplink ../../bpf/to_uplink.c -- -I../../bpf -I../../bpf/third_party/libbpf -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu -Wall -Werror -O2 -g
//go:generate go tool bpf2go -tags linux -target bpfel -no-global-types fromTunnel ../../bpf/from_tunnel.c -- -I../../bpf -I../../bpf/third_party/libbpf -idirafter /usr/include/x86_64-linux-gnu -idirafter /usr/include/aarch64-linux-gnu -Wall -Werror -O2 -g
