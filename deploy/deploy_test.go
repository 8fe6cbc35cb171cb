package deploy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/patchcord/patchcord/pkg/nodes"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	k8stesting "k8s.io/client-go/testing"
	"sigs.k8s.io/yaml"
)

// manifests are the files `kubectl apply -k deploy/` applies.
var manifests = []string{"rbac.yaml", "configmap.yaml", "daemonset.yaml"}

// strict decodes with client-go's scheme and rejects unknown and duplicate
// fields, so that a misspelt key (mountPropogation) fails here and not, as
// a silently dropped field, on a cluster.
var strict = serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()

// decodeFile decodes every YAML document of a manifest into typed objects.
func decodeFile(t *testing.T, name string) []runtime.Object {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var out []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", name, i, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := strict.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("%s: document %d: %v", name, i, err)
		}
		if obj.GetObjectKind().GroupVersionKind().Kind == "" {
			t.Fatalf("%s: document %d: no kind (%v)", name, i, gvk)
		}
		out = append(out, obj)
	}
	if len(out) == 0 {
		t.Fatalf("%s: no objects", name)
	}
	return out
}

func stripComments(doc []byte) []byte {
	var b bytes.Buffer
	for line := range bytes.Lines(doc) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			b.Write(line)
		}
	}
	return b.Bytes()
}

// objects decodes every manifest and indexes the objects by kind.
type objects struct {
	ds      *appsv1.DaemonSet
	sa      *corev1.ServiceAccount
	cm      *corev1.ConfigMap
	role    *rbacv1.ClusterRole
	binding *rbacv1.ClusterRoleBinding
}

func loadObjects(t *testing.T) objects {
	t.Helper()
	var o objects
	for _, name := range manifests {
		for _, obj := range decodeFile(t, name) {
			switch v := obj.(type) {
			case *appsv1.DaemonSet:
				o.ds = v
			case *corev1.ServiceAccount:
				o.sa = v
			case *corev1.ConfigMap:
				o.cm = v
			case *rbacv1.ClusterRole:
				o.role = v
			case *rbacv1.ClusterRoleBinding:
				o.binding = v
			default:
				t.Errorf("%s: unexpected %T", name, obj)
			}
		}
	}
	if o.ds == nil || o.sa == nil || o.cm == nil || o.role == nil || o.binding == nil {
		t.Fatalf("missing objects: %+v", o)
	}
	return o
}

func container(t *testing.T, cs []corev1.Container, name string) corev1.Container {
	t.Helper()
	i := slices.IndexFunc(cs, func(c corev1.Container) bool { return c.Name == name })
	if i < 0 {
		t.Fatalf("no container %s", name)
	}
	return cs[i]
}

// flag returns the value of --name=value in args.
func flag(args []string, name string) (string, bool) {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name {
			return "", true
		}
	}
	return "", false
}

// mountOf returns the volume mounted at path in c.
func mountOf(t *testing.T, c corev1.Container, path string) corev1.VolumeMount {
	t.Helper()
	i := slices.IndexFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.MountPath == path })
	if i < 0 {
		t.Fatalf("container %s mounts nothing at %s: %+v", c.Name, path, c.VolumeMounts)
	}
	return c.VolumeMounts[i]
}

func volume(t *testing.T, spec corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	i := slices.IndexFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == name })
	if i < 0 {
		t.Fatalf("no volume %s", name)
	}
	return spec.Volumes[i]
}

func hostPath(t *testing.T, spec corev1.PodSpec, name string) string {
	t.Helper()
	v := volume(t, spec, name)
	if v.HostPath == nil {
		t.Fatalf("volume %s is not a hostPath: %+v", name, v.VolumeSource)
	}
	return v.HostPath.Path
}

func nodeNameEnv(t *testing.T, c corev1.Container) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			return
		}
	}
	t.Errorf("container %s: no NODE_NAME from spec.nodeName: %+v", c.Name, c.Env)
}

func TestDaemonSet(t *testing.T) {
	o := loadObjects(t)
	ds := o.ds
	spec := ds.Spec.Template.Spec
	if ds.Namespace != "kube-system" {
		t.Errorf("namespace %q, want kube-system", ds.Namespace)
	}
	for k, v := range ds.Spec.Selector.MatchLabels {
		if ds.Spec.Template.Labels[k] != v {
			t.Errorf("selector %s=%s does not match the pod labels %v", k, v, ds.Spec.Template.Labels)
		}
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork is off: the agent must configure the node's own interfaces and routes")
	}
	if spec.ServiceAccountName != o.sa.Name || ds.Namespace != o.sa.Namespace {
		t.Errorf("serviceAccountName %s/%s, the RBAC's is %s/%s", ds.Namespace, spec.ServiceAccountName, o.sa.Namespace, o.sa.Name)
	}
	if !slices.ContainsFunc(spec.Tolerations, func(t corev1.Toleration) bool {
		return t.Operator == corev1.TolerationOpExists && t.Key == "" && t.Effect == ""
	}) {
		t.Error("no toleration of every taint: nodes without a pod network are NotReady and tainted")
	}

	for _, v := range []struct{ volume, path string }{
		{"bpffs", "/sys/fs/bpf"},
		{"cni-bin", "/opt/cni/bin"},
		{"cni-conf", "/etc/cni/net.d"},
	} {
		if got := hostPath(t, spec, v.volume); got != v.path {
			t.Errorf("volume %s is hostPath %s, want %s", v.volume, got, v.path)
		}
	}

	agent := container(t, spec.Containers, "agent")
	if sc := agent.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Error("agent is not privileged: it loads BPF and changes the node's network")
	}
	if len(agent.Args) == 0 || !slices.Contains(agent.Args, "agent") {
		t.Errorf("agent args %v lack the agent command", agent.Args)
	}
	for _, f := range []string{"flannel-compat", "metrics-addr", "vxlan-port"} {
		if _, ok := flag(agent.Args, f); !ok {
			t.Errorf("agent args %v lack --%s", agent.Args, f)
		}
	}
	if v, _ := flag(agent.Args, "metrics-addr"); v != ":9964" {
		t.Errorf("--metrics-addr=%s, want :9964", v)
	}
	if i := slices.IndexFunc(agent.Ports, func(p corev1.ContainerPort) bool { return p.Name == "metrics" }); i < 0 || agent.Ports[i].ContainerPort != 9964 {
		t.Errorf("no metrics port 9964: %+v", agent.Ports)
	}
	if ds.Spec.Template.Annotations["prometheus.io/port"] != "9964" {
		t.Errorf("prometheus.io/port annotation %q", ds.Spec.Template.Annotations["prometheus.io/port"])
	}
	nodeNameEnv(t, agent)
	bpf := mountOf(t, agent, "/sys/fs/bpf")
	if bpf.Name != "bpffs" || bpf.MountPropagation == nil || *bpf.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("bpffs mount %+v: want volume bpffs, Bidirectional, so the CNI plugin on the host sees the agent's pins", bpf)
	}
	if root, _ := flag(agent.Args, "bpffs-root"); root != "" && !strings.HasPrefix(root, "/sys/fs/bpf/") {
		t.Errorf("--bpffs-root=%s is not on the shared /sys/fs/bpf", root)
	}
	if m := mountOf(t, agent, "/run/xtables.lock"); hostPath(t, spec, m.Name) != "/run/xtables.lock" {
		t.Error("the xtables lock is not the host's: iptables-restore would race kube-proxy")
	}

	// The init step installs the plugin binary and the conflist where the
	// host's runtime looks, from where the image and the ConfigMap put them.
	install := container(t, spec.InitContainers, "install-cni")
	if !slices.Equal(install.Command, []string{"/usr/local/bin/patchcord-install"}) {
		t.Errorf("install-cni command %v", install.Command)
	}
	nodeNameEnv(t, install)
	for _, f := range []struct{ flag, volume string }{{"cni-bin-dir", "cni-bin"}, {"cni-conf-dir", "cni-conf"}} {
		dir, ok := flag(install.Args, f.flag)
		if !ok {
			t.Errorf("install-cni args %v lack --%s", install.Args, f.flag)
			continue
		}
		if m := mountOf(t, install, dir); m.Name != f.volume || m.ReadOnly {
			t.Errorf("--%s=%s is volume %s (read-only %v), want writable %s", f.flag, dir, m.Name, m.ReadOnly, f.volume)
		}
	}
	tmpl, _ := flag(install.Args, "conf-template")
	m := mountOf(t, install, filepath.Dir(tmpl))
	cmVol := volume(t, spec, m.Name)
	if cmVol.ConfigMap == nil || cmVol.ConfigMap.Name != o.cm.Name {
		t.Fatalf("--conf-template=%s is not in ConfigMap %s: volume %+v", tmpl, o.cm.Name, cmVol)
	}
	if _, ok := o.cm.Data[filepath.Base(tmpl)]; !ok {
		t.Errorf("ConfigMap %s has no key %s", o.cm.Name, filepath.Base(tmpl))
	}
	if o.cm.Namespace != ds.Namespace {
		t.Errorf("ConfigMap in %s, DaemonSet in %s", o.cm.Namespace, ds.Namespace)
	}
	if agent.Image != install.Image {
		t.Errorf("agent image %s, install-cni image %s: one image carries both", agent.Image, install.Image)
	}
}

func TestRBAC(t *testing.T) {
	o := loadObjects(t)
	var verbs []string
	for _, r := range o.role.Rules {
		if slices.Contains(r.APIGroups, "") && slices.Contains(r.Resources, "nodes") {
			verbs = append(verbs, r.Verbs...)
		}
	}
	for _, v := range []string{"get", "list", "watch", "patch"} {
		if !slices.Contains(verbs, v) {
			t.Errorf("ClusterRole %s cannot %s nodes (verbs %v)", o.role.Name, v, verbs)
		}
	}
	// Least privilege: nodes only, and no writes but patch.
	for _, r := range o.role.Rules {
		if !slices.Equal(r.Resources, []string{"nodes"}) || slices.ContainsFunc(r.Verbs, func(v string) bool { return v == "*" || v == "update" || v == "delete" || v == "create" }) {
			t.Errorf("rule grants more than reading and patching nodes: %+v", r)
		}
	}
	b := o.binding
	if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.Name != o.role.Name {
		t.Errorf("binding refers to %s %s, want ClusterRole %s", b.RoleRef.Kind, b.RoleRef.Name, o.role.Name)
	}
	if !slices.ContainsFunc(b.Subjects, func(s rbacv1.Subject) bool {
		return s.Kind == "ServiceAccount" && s.Name == o.sa.Name && s.Namespace == o.sa.Namespace
	}) {
		t.Errorf("binding subjects %+v lack ServiceAccount %s/%s", b.Subjects, o.sa.Namespace, o.sa.Name)
	}
}

// conflistOf renders the ConfigMap's conflist for a pod CIDR.
func conflistOf(t *testing.T, o objects, cidr string) (name string, conf map[string]any) {
	t.Helper()
	if len(o.cm.Data) != 1 {
		t.Fatalf("ConfigMap holds %d files, want one conflist", len(o.cm.Data))
	}
	for name, tmpl := range o.cm.Data {
		out, err := RenderConflist([]byte(tmpl), netip.MustParsePrefix(cidr))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := json.Unmarshal(out, &conf); err != nil {
			t.Fatal(err)
		}
		return name, conf
	}
	return "", nil
}

func TestConflist(t *testing.T) {
	o := loadObjects(t)
	name, conf := conflistOf(t, o, "10.244.7.0/24")
	if !strings.HasSuffix(name, ".conflist") || name >= "10-flannel.conflist" {
		t.Errorf("conflist %s must end in .conflist and sort before 10-flannel.conflist", name)
	}
	plugins := conf["plugins"].([]any)
	first := plugins[0].(map[string]any)
	if first["type"] != "patchcord-cni" {
		t.Errorf("first plugin %v, want patchcord-cni (primary mode)", first["type"])
	}
	ipam := first["ipam"].(map[string]any)
	subnet := ipam["ranges"].([]any)[0].([]any)[0].(map[string]any)["subnet"]
	if ipam["type"] != "host-local" || subnet != "10.244.7.0/24" {
		t.Errorf("ipam %v: want host-local on the node's pod CIDR", ipam)
	}
	if strings.Contains(o.cm.Data[name], "\"mtu\"") {
		t.Error("the conflist fixes an MTU: the plugin takes the agent's (uplink - 50)")
	}
}

// TestContainerfile checks that the image holds what the DaemonSet and the
// conflist use: the commands, the plugin dir, every plugin type.
func TestContainerfile(t *testing.T) {
	data, err := os.ReadFile("Containerfile")
	if err != nil {
		t.Fatal(err)
	}
	cf := string(data)
	if n := len(regexp.MustCompile(`(?m)^FROM `).FindAllString(cf, -1)); n < 2 {
		t.Errorf("%d stages, want a multi-stage build", n)
	}
	for _, pkg := range []string{"./cmd/patchcord", "./cmd/patchcord-cni", "./deploy/install"} {
		if !regexp.MustCompile(`(?m)go build .* ` + regexp.QuoteMeta(pkg) + `( |$)`).MatchString(cf) {
			t.Errorf("Containerfile does not build %s", pkg)
		}
		if _, err := os.Stat(filepath.Join("..", pkg)); err != nil {
			t.Errorf("Containerfile builds %s: %v", pkg, err)
		}
	}
	o := loadObjects(t)
	spec := o.ds.Spec.Template.Spec
	install := container(t, spec.InitContainers, "install-cni")
	agent := container(t, spec.Containers, "agent")
	for _, cmd := range []string{agent.Command[0], install.Command[0]} {
		if filepath.Dir(cmd) != "/usr/local/bin" || !strings.Contains(cf, "-o /out/bin/"+filepath.Base(cmd)+" ") || !strings.Contains(cf, "COPY --from=build /out/bin/ /usr/local/bin/") {
			t.Errorf("the image has no %s", cmd)
		}
	}
	src, _ := flag(install.Args, "bin-src")
	if !strings.Contains(cf, "COPY --from=build /out/cni/ "+src+"/") {
		t.Errorf("the image puts no plugins in --bin-src=%s", src)
	}
	// patchcord-cni is built, the reference plugins go-installed.
	shipped := func(typ string) bool {
		return strings.Contains(cf, "-o /out/cni/"+typ+" ") || strings.Contains(cf, "/"+typ+"@${PLUGINS_VERSION}")
	}
	_, conf := conflistOf(t, o, "10.244.7.0/24")
	for _, p := range conf["plugins"].([]any) {
		p := p.(map[string]any)
		types := []any{p["type"]}
		if ipam, ok := p["ipam"].(map[string]any); ok {
			types = append(types, ipam["type"])
		}
		for _, typ := range types {
			if !shipped(typ.(string)) {
				t.Errorf("the conflist uses plugin %s, which the image does not ship", typ)
			}
		}
	}
	// The runtime brings up each pod's lo with it.
	if !shipped("loopback") {
		t.Error("the image does not ship loopback")
	}
}

func TestKustomization(t *testing.T) {
	data, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		Resources []string `json:"resources"`
		Images    []struct {
			Name string `json:"name"`
		} `json:"images"`
	}
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		// Unknown top-level keys are kustomize's, not errors here.
		if err := yaml.Unmarshal(data, &k); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(slices.Sorted(slices.Values(k.Resources)), slices.Sorted(slices.Values(manifests))) {
		t.Errorf("kustomization resources %v, want %v", k.Resources, manifests)
	}
	yamls, _ := filepath.Glob("*.yaml")
	for _, f := range yamls {
		if f != "kustomization.yaml" && !slices.Contains(k.Resources, f) {
			t.Errorf("%s is not in the kustomization", f)
		}
	}
	o := loadObjects(t)
	image := container(t, o.ds.Spec.Template.Spec.Containers, "agent").Image
	if len(k.Images) == 0 || !strings.HasPrefix(image, k.Images[0].Name+":") {
		t.Errorf("kustomization images %+v do not name the DaemonSet's %s", k.Images, image)
	}
}

func TestInstall(t *testing.T) {
	o := loadObjects(t)
	dir := t.TempDir()
	opts := InstallOptions{
		BinSrc:       filepath.Join(dir, "src"),
		BinDir:       filepath.Join(dir, "opt-cni-bin"),
		ConfTemplate: filepath.Join(dir, "template", "05-patchcord.conflist"),
		ConfDir:      filepath.Join(dir, "etc-cni-net.d"),
		Poll:         time.Millisecond,
	}
	for _, d := range []string{opts.BinSrc, opts.BinDir, opts.ConfDir, filepath.Dir(opts.ConfTemplate)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"patchcord-cni", "host-local"} {
		if err := os.WriteFile(filepath.Join(opts.BinSrc, p), []byte("#!/bin/sh\necho "+p+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// An old plugin binary is replaced, not written into.
	if err := os.WriteFile(filepath.Join(opts.BinDir, "patchcord-cni"), []byte("old"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(opts.ConfTemplate, []byte(o.cm.Data["05-patchcord.conflist"]), 0o644); err != nil {
		t.Fatal(err)
	}

	// The node has no pod CIDR on the first two reads.
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "w1"}, Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.56.12"}}}}
	client := fake.NewClientset(node)
	var gets atomic.Int32
	client.PrependReactor("get", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if gets.Add(1) <= 2 {
			return true, node.DeepCopy(), nil
		}
		n := node.DeepCopy()
		n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.244.2.0/24", []string{"10.244.2.0/24"}
		return true, n, nil
	})
	log := slog.New(slog.DiscardHandler)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Install(ctx, opts, &nodes.Kube{Client: client, NodeName: "w1", Log: log}, log); err != nil {
		t.Fatal(err)
	}
	if gets.Load() != 3 {
		t.Errorf("node read %d times, want 3 (until it had a pod CIDR)", gets.Load())
	}
	for _, p := range []string{"patchcord-cni", "host-local"} {
		st, err := os.Stat(filepath.Join(opts.BinDir, p))
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(filepath.Join(opts.BinDir, p))
		if st.Mode().Perm() != 0o755 || !strings.Contains(string(data), "echo "+p) {
			t.Errorf("%s: mode %v, content %q", p, st.Mode(), data)
		}
	}
	conf, err := os.ReadFile(filepath.Join(opts.ConfDir, "05-patchcord.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conf), `"subnet": "10.244.2.0/24"`) || strings.Contains(string(conf), PodCIDRPlaceholder) {
		t.Errorf("conflist not rendered for 10.244.2.0/24:\n%s", conf)
	}
	// Nothing half-written is left behind.
	for _, d := range []string{opts.BinDir, opts.ConfDir} {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), ".") {
				t.Errorf("temporary file %s left in %s", e.Name(), d)
			}
		}
	}

	t.Run("gives up", func(t *testing.T) {
		client := fake.NewClientset(node)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		err := Install(ctx, opts, &nodes.Kube{Client: client, NodeName: "w1", Log: log}, log)
		if err == nil || !strings.Contains(err.Error(), "spec.podCIDR is empty") {
			t.Errorf("Install on a node that never gets a pod CIDR: %v", err)
		}
	})
	t.Run("bad template", func(t *testing.T) {
		if _, err := RenderConflist([]byte(`{"cniVersion":"1.0.0","plugins":[]}`), netip.MustParsePrefix("10.244.2.0/24")); err == nil {
			t.Error("a conflist without a name rendered")
		}
	})
}

// TestVagrantfile checks that the Vagrantfile parses and that its
// provisioning scripts are valid shell: the VMs cannot run here.
func TestVagrantfile(t *testing.T) {
	ruby, err := exec.LookPath("ruby")
	if err != nil {
		t.Fatal("ruby not found: apt-get install ruby (make deps installs it)")
	}
	out, err := exec.Command(ruby, "-c", "../Vagrantfile").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Syntax OK") {
		t.Errorf("ruby -c Vagrantfile: %v\n%s", err, out)
	}
	scripts, _ := filepath.Glob("vagrant/*.sh")
	if len(scripts) == 0 {
		t.Fatal("no provisioning scripts in deploy/vagrant")
	}
	vf, err := os.ReadFile("../Vagrantfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range scripts {
		if out, err := exec.Command("bash", "-n", s).CombinedOutput(); err != nil {
			t.Errorf("bash -n %s: %v\n%s", s, err, out)
		}
		if !strings.Contains(string(vf), "deploy/"+s) {
			t.Errorf("the Vagrantfile never runs %s", s)
		}
	}
	// The cluster runs patchcord from deploy/, through the DaemonSet.
	all := string(vf)
	for _, s := range scripts {
		b, _ := os.ReadFile(s)
		all += string(b)
	}
	for _, want := range []string{"kubectl apply -k /vagrant/deploy", "mode: iptables", "deploy/Containerfile"} {
		if !strings.Contains(all, want) {
			t.Errorf("the Vagrant setup lacks %q", want)
		}
	}
}
