// The sandbox ("pause") image: no registry is reachable, so it is built here from a
// tiny static Go program and written as an OCI archive for ctr to import.
package lab

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
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

// writePauseArchive writes the pause image's archive: a single layer holding
// /pause, which is also the entrypoint.
func writePauseArchive(path string, pause []byte) error {
	img := Image{Name: PauseImage, Entrypoint: []string{"/pause"}, Files: []ImageFile{{Path: "pause", Mode: 0o755, Body: pause}}}
	return img.WriteArchive(path)
}
