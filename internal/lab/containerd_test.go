// Tests of the containerd runtime of a lab node: the pause image archive is a valid OCI
// layout, and containerd runs sandboxes in a node's namespace through the reference CNI
// plugins, survives a restart with them, and leaves nothing in the root namespace, its
// mounts or its cgroups. The second needs root, containerd, runc and crictl.
package lab

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestPauseArchive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pause.tar")
	if err := writePauseArchive(path, []byte("\x7fELF not really")); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
	}
	blob := func(digest string) []byte {
		t.Helper()
		hexd, ok := strings.CutPrefix(digest, "sha256:")
		b, found := files["blobs/sha256/"+hexd]
		if !ok || !found {
			t.Fatalf("blob %s missing", digest)
		}
		sum := sha256.Sum256(b)
		if hex.EncodeToString(sum[:]) != hexd {
			t.Fatalf("blob %s has digest %x", digest, sum)
		}
		return b
	}
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout: %q", files["oci-layout"])
	}
	type desc struct {
		Digest      string            `json:"digest"`
		Annotations map[string]string `json:"annotations"`
	}
	var index struct {
		Manifests []desc `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v\n%s", err, files["index.json"])
	}
	if got := index.Manifests[0].Annotations["io.containerd.image.name"]; got != PauseImage {
		t.Errorf("image name %q, want %q", got, PauseImage)
	}
	var manifest struct {
		Config desc   `json:"config"`
		Layers []desc `json:"layers"`
	}
	if err := json.Unmarshal(blob(index.Manifests[0].Digest), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		Architecture string `json:"architecture"`
		Config       struct {
			Entrypoint []string `json:"Entrypoint"`
		} `json:"config"`
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	if config.Architecture != runtime.GOARCH || fmt.Sprint(config.Config.Entrypoint) != "[/pause]" ||
		fmt.Sprint(config.RootFS.DiffIDs) != fmt.Sprint([]string{manifest.Layers[0].Digest}) {
		t.Errorf("config: %+v", config)
	}
	lr := tar.NewReader(strings.NewReader(string(blob(manifest.Layers[0].Digest))))
	h, err := lr.Next()
	if err != nil || h.Name != "pause" || h.Mode&0o111 == 0 {
		t.Fatalf("layer: %v %+v", err, h)
	}
}

// cdRepoTool finds a tool the Makefile installs: $env, then bin/<sub>/<name> of this repo.
func cdRepoTool(tb testing.TB, env, sub, name string) string {
	tb.Helper()
	_, file, _, _ := runtime.Caller(0)
	for _, p := range []string{os.Getenv(env), filepath.Join(filepath.Dir(file), "..", "..", "bin", sub, name)} {
		if p != "" && cdExists(p) {
			return p
		}
	}
	tb.Fatalf("%s not found ($%s, bin/%s): run `make tools`", name, env, sub)
	return ""
}

func TestContainerd(t *testing.T) {
	RequireRoot(t)
	cniDir := os.Getenv("CNI_PLUGINS")
	if cniDir == "" {
		cniDir = filepath.Dir(cdRepoTool(t, "", "cni", "ptp"))
	}
	crictl := cdRepoTool(t, "CRICTL", "tools", "crictl")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	l := NewForTest(t, Options{CNIPath: []string{cniDir}})
	n, err := l.AddNode(1)
	if err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"ptp","plugins":[{"type":"ptp","ipMasq":false,
		"ipam":{"type":"host-local","ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":%q}}]}`,
		n.PodCIDR, n.IPAMDir)
	if err := n.WriteConflist("ptp", []byte(conf)); err != nil {
		t.Fatal(err)
	}
	// A machine may run its own containerd: what counts is that this one adds
	// nothing to the root mount namespace, so compare with the state before.
	before := cdRootPaths()
	c, err := n.StartContainerd(ctx, ContainerdOptions{Crictl: crictl})
	if err != nil {
		t.Fatal(err)
	}
	assertNoRootPaths(t, before)

	s, err := c.RunPod(ctx, SandboxSpec{Name: "a"})
	if err != nil {
		t.Fatal(err)
	}
	assertMountsOwn(t, c, l)
	if !n.PodCIDR.Contains(s.IP) {
		t.Errorf("sandbox got %s, outside %s", s.IP, n.PodCIDR)
	}
	if !strings.HasPrefix(s.NetNS, c.Dir) {
		t.Errorf("sandbox netns %s is not below containerd's state in %s", s.NetNS, c.Dir)
	}
	if out, err := n.Exec(ctx, "ping", "-c", "1", "-W", "2", s.IP.String()); err != nil {
		t.Fatalf("node to sandbox: %v\n%s", err, out)
	}
	if out, err := s.Exec(ctx, "ip", "-4", "-o", "addr", "show", "eth0"); err != nil || !strings.Contains(string(out), s.IP.String()) {
		t.Errorf("sandbox eth0: %v\n%s", err, out)
	}

	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Inspect(ctx); err != nil {
		t.Fatalf("after restart: %v", err)
	}
	if out, err := n.Exec(ctx, "ping", "-c", "1", "-W", "2", s.IP.String()); err != nil {
		t.Fatalf("node to sandbox after restart: %v\n%s", err, out)
	}

	pid := s.Pid
	if err := s.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	if err := WaitFor(ctx, "sandbox process gone", func(context.Context) error {
		if cdExists(fmt.Sprintf("/proc/%d", pid)) {
			return errors.New("still there")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if lease := filepath.Join(n.IPAMDir, "ptp", s.IP.String()); cdExists(lease) {
		t.Errorf("lease %s left after rmp", lease)
	}

	// One left running for Close.
	s2, err := c.RunPod(ctx, SandboxSpec{Name: "b"})
	if err != nil {
		t.Fatal(err)
	}
	holder := c.holder.Pid()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if cdExists(fmt.Sprintf("/proc/%d", s2.Pid)) || cdExists(fmt.Sprintf("/proc/%d", holder)) {
		t.Errorf("sandbox %d or holder %d still running after Close", s2.Pid, holder)
	}
	for _, h := range cgroupHierarchies() {
		if p := filepath.Join(h, c.CgroupParent); cdExists(p) {
			t.Errorf("cgroup %s left", p)
		}
	}
	assertNoRootPaths(t, before)
}

// cdRootPaths are the places a containerd that leaked out of its mount
// namespace would write, with whether each exists now.
func cdRootPaths() map[string]bool {
	m := make(map[string]bool)
	for _, p := range []string{"/run/containerd", "/var/lib/containerd", "/opt/containerd"} {
		m[p] = cdExists(p)
	}
	return m
}

// assertNoRootPaths fails for each of cdRootPaths that exists now but did not
// before: the test's containerd created it.
func assertNoRootPaths(tb testing.TB, before map[string]bool) {
	tb.Helper()
	for p, existed := range before {
		if !existed && cdExists(p) {
			tb.Errorf("%s created in the root mount namespace", p)
		}
	}
}

// assertMountsOwn checks that containerd's mount namespace holds no other
// namespace (of this lab or another) and no other lab's bpffs: its copies
// would keep them alive.
func assertMountsOwn(tb testing.TB, c *Containerd, l *Lab) {
	tb.Helper()
	mounts, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", c.holder.Pid()))
	if err != nil {
		tb.Fatal(err)
	}
	for line := range strings.Lines(string(mounts)) {
		f := strings.Fields(line)
		i := slices.Index(f, "-")
		if i < 0 || i+1 >= len(f) {
			continue
		}
		switch fs, mp := f[i+1], f[4]; {
		case fs == "nsfs" && !strings.HasPrefix(mp, c.Dir+"/"):
			tb.Errorf("containerd's mount namespace holds namespace mount %s", mp)
		case fs == "bpf" && !strings.HasPrefix(mp, l.Dir+"/"):
			tb.Errorf("containerd's mount namespace holds bpffs %s", mp)
		}
	}
}
