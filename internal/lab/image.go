// Container images without a registry: an Image is written as an OCI image
// layout in a tar, which `ctr images import` takes under the image's name.
package lab

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Image is a one-layer image.
type Image struct {
	// Name is the full reference, e.g. "localhost/patchcord:dev".
	Name       string
	Entrypoint []string
	Cmd        []string
	Env        []string
	Files      []ImageFile
}

// ImageFile is a regular file, or with Link a symlink, of an image's layer.
type ImageFile struct {
	Path string // relative to the image's root
	Mode int64
	Body []byte
	Link string
}

// WriteArchive writes img's OCI image layout, as a tar, to path.
func (img Image) WriteArchive(path string) error {
	layer, err := tarFiles(withParents(img.Files))
	if err != nil {
		return err
	}
	index, blobs, err := img.blobs(layer)
	if err != nil {
		return err
	}
	files := []ImageFile{{Path: "oci-layout", Mode: 0o644, Body: []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {Path: "index.json", Mode: 0o644, Body: index}}
	for _, d := range slices.Sorted(maps.Keys(blobs)) {
		files = append(files, ImageFile{Path: "blobs/sha256/" + strings.TrimPrefix(d, "sha256:"), Mode: 0o644, Body: blobs[d]})
	}
	out, err := tarFiles(files)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, out, 0o644); err != nil {
		return fmt.Errorf("write image %s: %w", img.Name, err)
	}
	return nil
}

// withParents sorts files by path and puts a directory entry before the
// first file below each directory: a layer's tar must make its directories.
func withParents(files []ImageFile) []ImageFile {
	byPath := map[string]ImageFile{}
	for _, f := range files {
		f.Path = strings.TrimPrefix(path.Clean("/"+f.Path), "/")
		byPath[f.Path] = f
		for d := path.Dir(f.Path); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := byPath[d]; !ok {
				byPath[d] = ImageFile{Path: d, Mode: 0o755 | int64(os.ModeDir)}
			}
		}
	}
	return slices.SortedFunc(maps.Values(byPath), func(a, b ImageFile) int { return strings.Compare(a.Path, b.Path) })
}

// tarFiles archives files in order, with zero timestamps, so that the same
// input gives the same bytes (and the image the same digests).
func tarFiles(files []ImageFile) ([]byte, error) {
	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	for _, f := range files {
		h := &tar.Header{Name: f.Path, Mode: f.Mode &^ int64(os.ModeDir), ModTime: time.Unix(0, 0)}
		switch {
		case f.Link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.Link, 0o777
		case f.Mode&int64(os.ModeDir) != 0:
			h.Typeflag, h.Name = tar.TypeDir, f.Path+"/"
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.Body); err != nil {
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

// blobs builds the image of the one layer: its index, and every blob by
// digest (layer, config, manifest).
func (img Image) blobs(layer []byte) (index []byte, blobs map[string][]byte, err error) {
	blobs = map[string][]byte{}
	blob := func(mediaType string, b []byte) ociDescriptor {
		sum := sha256.Sum256(b)
		d := "sha256:" + hex.EncodeToString(sum[:])
		blobs[d] = b
		return ociDescriptor{MediaType: mediaType, Digest: d, Size: len(b)}
	}
	layerDesc := blob("application/vnd.oci.image.layer.v1.tar", layer)
	cfg := map[string]any{"Entrypoint": img.Entrypoint}
	if img.Cmd != nil {
		cfg["Cmd"] = img.Cmd
	}
	if img.Env != nil {
		cfg["Env"] = img.Env
	}
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       cfg,
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
	_, tag, _ := strings.Cut(img.Name[strings.LastIndexByte(img.Name, '/')+1:], ":")
	manifestDesc.Annotations = map[string]string{
		"io.containerd.image.name":          img.Name,
		"org.opencontainers.image.ref.name": tag,
	}
	index, err = json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests":     []ociDescriptor{manifestDesc},
	})
	return index, blobs, err
}

// HostFiles are this machine's files at paths, for an image: each dynamically
// linked program comes with the shared libraries ldd finds for it, and a
// symlink with what it points to, so that programs of the host's distribution
// run in an image that has nothing else.
func HostFiles(paths ...string) ([]ImageFile, error) {
	var files []ImageFile
	seen := map[string]bool{}
	var add func(p string) error
	add = func(p string) error {
		if seen[p] {
			return nil
		}
		seen[p] = true
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			files = append(files, ImageFile{Path: p, Link: target})
			if !filepath.IsAbs(target) {
				target = filepath.Join(filepath.Dir(p), target)
			}
			return add(target)
		case fi.IsDir():
			entries, err := os.ReadDir(p)
			if err != nil {
				return err
			}
			for _, e := range entries {
				if err := add(filepath.Join(p, e.Name())); err != nil {
					return err
				}
			}
			return nil
		}
		body, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		files = append(files, ImageFile{Path: p, Mode: int64(fi.Mode().Perm()), Body: body})
		libs, err := sharedLibraries(p, body)
		if err != nil {
			return err
		}
		for _, lib := range libs {
			if err := add(lib); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range paths {
		if err := add(p); err != nil {
			return nil, fmt.Errorf("host file for an image: %w", err)
		}
	}
	return files, nil
}

// sharedLibraries lists the libraries (and the loader) ldd resolves for an
// ELF executable or library; nothing for other files or static programs.
func sharedLibraries(p string, body []byte) ([]string, error) {
	if !bytes.HasPrefix(body, []byte("\x7fELF")) {
		return nil, nil
	}
	out, err := exec.Command("ldd", p).Output()
	if err != nil {
		// "not a dynamic executable": ldd exits 1.
		return nil, nil
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		case len(f) >= 2 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("%s: library %s not found", p, f[0])
		}
	}
	return libs, nil
}
