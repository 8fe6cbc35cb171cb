// The sandbox ("pause") image: no registry is reachable, so it is built here from a
// tiny static Go program and written as an OCI archive for ctr to import.
package lab

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// pauseSource is the sandbox process: it holds the pod's namespaces and exits on SIGTERM
// or SIGINT (CRI stops sandboxes with SIGKILL anyway).
const pauseSource = `package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
`

// buildPauseImage compiles the pause binary (static: the image holds nothing else) and
// writes an OCI image archive of it to dir, named PauseImage; it returns the archive's
// path.
func buildPauseImage(ctx context.Context, dir string) (string, error) {
	src := filepath.Join(dir, "pause-src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return "", err
	}
	files := map[string]string{"main.go": pauseSource, "go.mod": "module pause\n\ngo 1.22\n"}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(src, name), []byte(body), 0o644); err != nil {
			return "", err
		}
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(src, "pause")
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH, "GOWORK=off", "GOFLAGS=")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build pause binary: %w\n%s", err, out)
	}
	pause, err := os.ReadFile(bin)
	if err != nil {
		return "", err
	}
	archive := filepath.Join(dir, "pause.oci.tar")
	if err := writePauseArchive(archive, pause); err != nil {
		return "", fmt.Errorf("write pause image: %w", err)
	}
	return archive, nil
}

// writePauseArchive writes an OCI image layout, as a tar, with one image: a single
// uncompressed layer holding /pause, which is also the entrypoint.
func writePauseArchive(path string, pause []byte) error {
	layer, err := tarFiles([]tarFile{{"pause", 0o755, pause}})
	if err != nil {
		return err
	}
	index, blobs, err := pauseImage(layer)
	if err != nil {
		return err
	}
	files := []tarFile{{"oci-layout", 0o644, []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {"index.json", 0o644, index}}
	for _, d := range slices.Sorted(maps.Keys(blobs)) {
		files = append(files, tarFile{"blobs/sha256/" + strings.TrimPrefix(d, "sha256:"), 0o644, blobs[d]})
	}
	out, err := tarFiles(files)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, 0o644)
}

// tarFile is one regular file of an archive tarFiles writes.
type tarFile struct {
	name string
	mode int64
	body []byte
}

// tarFiles archives files in order, with zero timestamps, so that the same
// input gives the same bytes (and the image the same digests).
func tarFiles(files []tarFile) ([]byte, error) {
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	for _, f := range files {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: f.mode, Size: int64(len(f.body)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// ociDescriptor is an OCI content descriptor.
type ociDescriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// pauseImage builds the OCI image of the one layer: its index, and every
// blob by digest (layer, config, manifest).
func pauseImage(layer []byte) (index []byte, blobs map[string][]byte, err error) {
	blobs = map[string][]byte{}
	blob := func(mediaType string, b []byte) ociDescriptor {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs[d] = b
		return ociDescriptor{MediaType: mediaType, Digest: d, Size: len(b)}
	}
	layerDesc := blob("application/vnd.oci.image.layer.v1.tar", layer)
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": []string{"/pause"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDesc.Digest}},
	})
	if err != nil {
		return nil, nil, err
	}
	configDesc := blob("application/vnd.oci.image.config.v1+json", config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        configDesc,
		"layers":        []ociDescriptor{layerDesc},
	})
	if err != nil {
		return nil, nil, err
	}
	manifestDesc := blob("application/vnd.oci.image.manifest.v1+json", manifest)
	_, tag, _ := strings.Cut(PauseImage[strings.LastIndexByte(PauseImage, '/')+1:], ":")
	manifestDesc.Annotations = map[string]string{
		"io.containerd.image.name":          PauseImage,
		"org.opencontainers.image.ref.name": tag,
	}
	index, err = json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests":     []ociDescriptor{manifestDesc},
	})
	return index, blobs, err
}
