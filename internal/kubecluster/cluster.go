// Package kubecluster runs a real Kubernetes control plane in a lab: etcd
// and kube-apiserver, built from the Go module proxy by `make k8s` (see
// test/k8s/go.mod), in a lab node's namespace, so the node source and the
// deploy/ manifests meet the API server operators run instead of a stand-in.
package kubecluster

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/e2e"
	"github.com/patchcord/patchcord/internal/lab"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

const (
	apiPort  = 6443
	etcdPort = 2379
	// ServiceCIDR is the cluster's Service range.
	ServiceCIDR = "10.96.0.0/16"
	// AgentUser is the name a token of the DaemonSet's ServiceAccount
	// authenticates as: deploy/rbac.yaml's binding grants it its rights.
	AgentUser = "system:serviceaccount:kube-system:patchcord"
	// ProxyUser is kube-proxy's user: the API server's bootstrap policy
	// binds it to system:node-proxier, kube-proxy's own role.
	ProxyUser = "system:kube-proxy"
)

// Bin is where the Kubernetes binaries are: $KUBE_BIN (set by the
// Makefile), else bin/k8s of this repo.
func Bin(tb testing.TB) string {
	tb.Helper()
	dir := os.Getenv("KUBE_BIN")
	if dir == "" {
		dir = filepath.Join(e2e.RepoDir(), "bin", "k8s")
	}
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			tb.Fatalf("%s not in %s: run `make k8s` (builds the release test/k8s/go.mod names from the Go module proxy)", b, dir)
		}
	}
	return dir
}

// ControlPlane is etcd and kube-apiserver running in one lab node.
type ControlPlane struct {
	Node *lab.Node
	// Server is the API's URL as the other lab nodes reach it.
	Server string
	// CAFile verifies the API server's self-signed serving certificate.
	CAFile string
	// Admin is a client with every right (group system:masters), for the
	// test's own setup; it dials from the control plane's namespace.
	Admin *kubernetes.Clientset
	dir   string
	// tokens by user name, from the static token file.
	tokens map[string]string
	// saKey signs ServiceAccount tokens; clientCA signs the client
	// certificates of users the token file does not know (kubelets).
	saKey    string
	clientCA *certAuthority
	logged   bool // logOnFailure ran
}

// Start brings up etcd and kube-apiserver in n and waits until the API is
// ready. Both stop when the lab closes.
func Start(t *testing.T, ctx context.Context, n *lab.Node) *ControlPlane {
	t.Helper()
	bin := Bin(t)
	dir := filepath.Join(n.Lab.Dir, fmt.Sprintf("kube-n%d", n.Index))
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		t.Fatal(err)
	}
	cp := &ControlPlane{
		Node:   n,
		Server: "https://" + net.JoinHostPort(n.IP.String(), strconv.Itoa(apiPort)),
		CAFile: filepath.Join(dir, "certs", "apiserver.crt"),
		dir:    dir,
		tokens: map[string]string{},
	}
	tokenFile := cp.writeTokens(t, map[string]string{
		"admin":   "system:masters",
		AgentUser: "system:serviceaccounts,system:serviceaccounts:kube-system",
		ProxyUser: "",
	})
	saKey := writeServiceAccountKey(t, dir)
	cp.saKey = saKey
	cp.clientCA = newCertAuthority(t, filepath.Join(dir, "client-ca.crt"))

	etcd, err := n.Start(ctx, filepath.Join(bin, "etcd"),
		"--name", "lab", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", "http://127.0.0.1:"+strconv.Itoa(etcdPort),
		"--advertise-client-urls", "http://127.0.0.1:"+strconv.Itoa(etcdPort),
		"--listen-peer-urls", "http://127.0.0.1:2380",
		"--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "lab=http://127.0.0.1:2380",
		"--log-level", "warn")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.WaitListening(ctx, etcdPort); err != nil {
		t.Fatalf("etcd in %s: %v", n.NetNS, err)
	}
	apiserver, err := n.Start(ctx, filepath.Join(bin, "kube-apiserver"),
		"--etcd-servers", "http://127.0.0.1:"+strconv.Itoa(etcdPort),
		"--bind-address", "0.0.0.0",
		"--advertise-address", n.IP.String(),
		"--secure-port", strconv.Itoa(apiPort),
		// Self-signed: the file it writes holds the serving certificate
		// and the CA that signed it, which clients trust through CAFile.
		"--cert-dir", filepath.Join(dir, "certs"),
		"--token-auth-file", tokenFile,
		"--client-ca-file", cp.clientCA.certFile,
		// Kubelets are authorized as nodes, limited to their own objects.
		"--authorization-mode", "Node,RBAC",
		"--enable-admission-plugins", "NodeRestriction",
		// A CNI's DaemonSet is privileged, as on every distribution.
		"--allow-privileged=true",
		// Logs, exec and port-forward go to the kubelet at the node's
		// address; the lab has no DNS for node names.
		"--kubelet-preferred-address-types", "InternalIP",
		"--service-cluster-ip-range", ServiceCIDR,
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", saKey,
		"--service-account-signing-key-file", saKey,
		// One machine runs several lab clusters and the tests beside them:
		// no flow control queues, no profiling endpoints.
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=1")
	if err != nil {
		t.Fatal(err)
	}
	// Their graceful shutdown is not under test, and each would take the
	// lab's whole stop timeout: the API server drains its watches, etcd
	// waits for the API server's connections.
	t.Cleanup(func() {
		apiserver.Kill()
		etcd.Kill()
	})
	// A cold start bootstraps RBAC and the built-in objects: seconds on an
	// idle machine, more beside other lab tests.
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	// The client reads the CA when it is made; the API server writes it
	// first thing.
	err = lab.WaitFor(wctx, "kube-apiserver's certificate", func(context.Context) error {
		_, err := os.Stat(cp.CAFile)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if cp.Admin, err = kubernetes.NewForConfig(cp.restConfig("admin")); err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(wctx, "kube-apiserver in "+n.NetNS+" to be ready", func(ctx context.Context) error {
		body, err := cp.Admin.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%v: %s", err, body)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return cp
}

// writeTokens writes the static token file, one random token per user with
// the given groups, and returns its path.
func (cp *ControlPlane) writeTokens(t *testing.T, groups map[string]string) string {
	t.Helper()
	var b strings.Builder
	for user, g := range groups {
		raw := make([]byte, 16)
		rand.Read(raw)
		tok := hex.EncodeToString(raw)
		cp.tokens[user] = tok
		fmt.Fprintf(&b, "%s,%s,%s", tok, user, user)
		if g != "" {
			fmt.Fprintf(&b, ",%q", g)
		}
		b.WriteByte('\n')
	}
	path := filepath.Join(cp.dir, "tokens.csv")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeServiceAccountKey writes the key the API server signs and checks
// ServiceAccount tokens with; it refuses to start without one.
func writeServiceAccountKey(t *testing.T, dir string) string {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "sa.key")
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(path, pemKey, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// restConfig is a client config for user that dials from the control
// plane's namespace: the test runs in the root namespace, which has no route
// into the lab.
func (cp *ControlPlane) restConfig(user string) *rest.Config {
	nsPath := cp.Node.NSPath
	return &rest.Config{
		Host:            cp.Server,
		BearerToken:     cp.tokens[user],
		TLSClientConfig: rest.TLSClientConfig{CAFile: cp.CAFile},
		Timeout:         30 * time.Second,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var conn net.Conn
			err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
				var err error
				conn, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return conn, err
		},
	}
}

// Kubeconfig writes a kubeconfig for user, one of the token file's, for
// processes in the lab's nodes, and returns its path.
func (cp *ControlPlane) Kubeconfig(t *testing.T, user string) string {
	t.Helper()
	tok, ok := cp.tokens[user]
	if !ok {
		t.Fatalf("no token for user %q", user)
	}
	return cp.writeKubeconfig(t, user, fmt.Sprintf("{token: %q}", tok))
}

// CertKubeconfig writes a kubeconfig whose client certificate, signed by
// the API server's client CA, names user in groups, and returns its path.
func (cp *ControlPlane) CertKubeconfig(t *testing.T, user string, groups ...string) string {
	t.Helper()
	base := filepath.Join(cp.dir, fileName(user))
	cert, key := cp.clientCA.issue(t, base, user, groups)
	return cp.writeKubeconfig(t, user, fmt.Sprintf("{client-certificate: %q, client-key: %q}", cert, key))
}

func (cp *ControlPlane) writeKubeconfig(t *testing.T, user, auth string) string {
	t.Helper()
	path := filepath.Join(cp.dir, fileName(user)+".kubeconfig")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters: [{name: lab, cluster: {server: %q, certificate-authority: %q}}]
users: [{name: %q, user: %s}]
contexts: [{name: lab, context: {cluster: lab, user: %q}}]
current-context: lab
`, cp.Server, cp.CAFile, user, auth, user)), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// fileName is user as a file name.
func fileName(user string) string {
	return strings.NewReplacer(":", "-", "/", "-").Replace(user)
}
