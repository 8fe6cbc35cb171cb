package lab

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A host program in an image brings its symlink chain, its libraries and
// the loader, and the layer makes every parent directory before its files.
func TestHostFiles(t *testing.T) {
	if _, err := exec.LookPath("ldd"); err != nil {
		t.Skip("no ldd")
	}
	dir := t.TempDir()
	// A symlink to a dynamically linked program of the host.
	sh, err := filepath.EvalSymlinks("/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "bin", "mysh")
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(sh, link); err != nil {
		t.Fatal(err)
	}
	files, err := HostFiles(link)
	if err != nil {
		t.Fatal(err)
	}
	byPath := map[string]ImageFile{}
	for _, f := range files {
		byPath[f.Path] = f
	}
	if f := byPath[link]; f.Link != sh {
		t.Errorf("%s: link %q, want %q", link, f.Link, sh)
	}
	if f, ok := byPath[sh]; !ok || len(f.Body) == 0 || f.Mode&0o111 == 0 {
		t.Errorf("%s missing or not executable", sh)
	}
	libc := false
	for p := range byPath {
		libc = libc || strings.Contains(filepath.Base(p), "libc.so")
	}
	if !libc {
		t.Errorf("no libc among %d files", len(files))
	}

	seen := map[string]bool{}
	for _, f := range withParents(files) {
		if strings.HasPrefix(f.Path, "/") {
			t.Errorf("%s: absolute path in a layer", f.Path)
		}
		if d := filepath.Dir(f.Path); d != "." && !seen[d] {
			t.Errorf("%s comes before its directory %s", f.Path, d)
		}
		seen[f.Path] = true
	}

	if _, err := HostFiles(filepath.Join(dir, "absent")); err == nil {
		t.Error("a missing host file gave no error")
	}
}
