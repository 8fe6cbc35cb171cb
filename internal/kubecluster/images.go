package kubecluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
)

const (
	// PatchcordImage is the image deploy/daemonset.yaml runs.
	PatchcordImage = "localhost/patchcord:dev"
	// AgnhostImage is the name Kubernetes' e2e framework (test/utils/image,
	// at the release test/k8s/go.mod pins) gives agnhost, its test server.
	AgnhostImage = "registry.k8s.io/e2e-test-images/agnhost:2.59"
)

// CoreDNSImage is CoreDNS's image name, tagged with the release
// test/coredns/go.mod builds.
func CoreDNSImage(t testing.TB) string {
	t.Helper()
	mod, err := os.ReadFile(filepath.Join(e2e.RepoDir(), "test", "coredns", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mod), "\n") {
		f := strings.Fields(strings.TrimPrefix(strings.TrimSpace(line), "require "))
		if len(f) >= 2 && f[0] == "github.com/coredns/coredns" {
			return "registry.k8s.io/coredns/coredns:" + f[1]
		}
	}
	t.Fatal("test/coredns/go.mod requires no github.com/coredns/coredns")
	return ""
}

// ImageArchive is an image, written for import.
type ImageArchive struct {
	Name, Path string
}

// BuildImages writes the archives of the images a lab cluster's nodes
// import into dir: patchcord's, as deploy/Containerfile lays it out but
// from this run's binaries and this machine's iptables; agnhost; CoreDNS.
func BuildImages(t *testing.T, dir, patchcordBin string, cniPath []string) []ImageArchive {
	t.Helper()
	pc, err := patchcordImage(patchcordBin, cniPath)
	if err != nil {
		t.Fatal(err)
	}
	agnhost, err := os.ReadFile(filepath.Join(Bin(t), "agnhost"))
	if err != nil {
		t.Fatalf("agnhost: %v (run `make k8s`)", err)
	}
	coredns, err := os.ReadFile(filepath.Join(Bin(t), "coredns"))
	if err != nil {
		t.Fatalf("coredns: %v (run `make k8s`)", err)
	}
	images := []lab.Image{pc, {
		Name:       AgnhostImage,
		Entrypoint: []string{"/agnhost"},
		Cmd:        []string{"pause"},
		Files:      []lab.ImageFile{{Path: "agnhost", Mode: 0o755, Body: agnhost}},
	}, {
		Name:       CoreDNSImage(t),
		Entrypoint: []string{"/coredns"},
		Files:      []lab.ImageFile{{Path: "coredns", Mode: 0o755, Body: coredns}},
	}}
	var out []ImageArchive
	for i, img := range images {
		path := filepath.Join(dir, fmt.Sprintf("image%d.oci.tar", i))
		if err := img.WriteArchive(path); err != nil {
			t.Fatal(err)
		}
		out = append(out, ImageArchive{Name: img.Name, Path: path})
	}
	return out
}

// patchcordImage holds the agent and CLI, the install step, the plugins the
// conflist chains, and iptables (the agent's masquerade rules) with its
// libraries: what deploy/Containerfile installs.
func patchcordImage(bin string, cniPath []string) (lab.Image, error) {
	img := lab.Image{Name: PatchcordImage, Entrypoint: []string{"/usr/local/bin/patchcord"}}
	add := func(src, dst string) error {
		body, err := os.ReadFile(src)
		if err != nil {
			return fmt.Errorf("patchcord image: %w", err)
		}
		img.Files = append(img.Files, lab.ImageFile{Path: dst, Mode: 0o755, Body: body})
		return nil
	}
	for _, b := range []string{"patchcord", "patchcord-install"} {
		if err := add(filepath.Join(bin, b), "usr/local/bin/"+b); err != nil {
			return img, err
		}
	}
	if err := add(filepath.Join(bin, "patchcord-cni"), "opt/patchcord/cni/patchcord-cni"); err != nil {
		return img, err
	}
	for _, p := range []string{"host-local", "portmap", "loopback"} {
		src := ""
		for _, d := range cniPath {
			if _, err := os.Stat(filepath.Join(d, p)); err == nil {
				src = filepath.Join(d, p)
				break
			}
		}
		if src == "" {
			return img, fmt.Errorf("patchcord image: CNI plugin %s not in %v", p, cniPath)
		}
		if err := add(src, "opt/patchcord/cni/"+p); err != nil {
			return img, err
		}
	}
	host := []string{"/usr/sbin/iptables", "/usr/sbin/iptables-restore", "/usr/sbin/iptables-save"}
	// iptables loads its matches and targets from here.
	ext, _ := filepath.Glob("/usr/lib/*/xtables")
	for _, f := range []string{"/etc/protocols", "/etc/services"} {
		if _, err := os.Stat(f); err == nil {
			host = append(host, f)
		}
	}
	files, err := lab.HostFiles(append(host, ext...)...)
	if err != nil {
		return img, fmt.Errorf("patchcord image: %w", err)
	}
	img.Files = append(img.Files, files...)
	return img, nil
}
