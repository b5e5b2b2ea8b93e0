// Command mkimage writes Ambit's container image as an OCI image layout in
// a tar file (`make image`): the static `ambit` binary at
// /usr/local/bin/ambit, its entrypoint, nothing else (no shell, no libc, no
// package manager). No registry and no container daemon are involved:
// go-containerregistry builds the image in memory. The result is
// reproducible (fixed timestamps, one file), so the same binary always
// gives the same digest. `ctr images import` and `skopeo copy
// oci-archive:` read it.
//
// It is a build tool, not a subcommand of `ambit`: it links
// go-containerregistry, which no process of the mesh needs.
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinaryPath is where the image holds the binary (ztunnel's image has
// /usr/local/bin/ztunnel).
const BinaryPath = "usr/local/bin/ambit"

// epoch is every timestamp in the image: reproducible builds.
var epoch = time.Unix(0, 0).UTC()

func main() {
	bin := flag.String("binary", "bin/ambit", "the static ambit binary")
	out := flag.String("out", "bin/ambit-image.tar", "the OCI layout tar to write")
	ref := flag.String("ref", "ambitmesh/ambit:dev", "the image's name (index.json annotations)")
	arch := flag.String("arch", runtime.GOARCH, "the binary's architecture")
	flag.Parse()
	digest, err := Write(*bin, *out, *ref, *arch)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %s %s\n", *out, *ref, digest)
}

// Write builds the image of binary and writes it to out as an OCI layout
// tar; it returns the manifest's digest.
func Write(binary, out, ref, arch string) (v1.Hash, error) {
	img, err := Image(binary, arch)
	if err != nil {
		return v1.Hash{}, err
	}
	dir, err := os.MkdirTemp("", "mkimage")
	if err != nil {
		return v1.Hash{}, err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("oci layout: %w", err)
	}
	// containerd names an imported image by io.containerd.image.name;
	// the OCI spec's ref.name is the tag.
	tag := ref
	if i := lastColon(ref); i >= 0 {
		tag = ref[i+1:]
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          "docker.io/" + ref,
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return v1.Hash{}, fmt.Errorf("oci layout: %w", err)
	}
	if err := tarDir(dir, out); err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

func lastColon(ref string) int {
	for i := len(ref) - 1; i >= 0 && ref[i] != '/'; i-- {
		if ref[i] == ':' {
			return i
		}
	}
	return -1
}

// Image is the binary in one layer, with its entrypoint.
func Image(binary, arch string) (v1.Image, error) {
	data, err := os.ReadFile(binary)
	if err != nil {
		return nil, err
	}
	if len(data) < 4 || !bytes.Equal(data[:4], []byte("\x7fELF")) {
		return nil, fmt.Errorf("%s is not an ELF binary", binary)
	}
	layerTar, err := oneFile(BinaryPath, data, 0o755)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.Append(img, mutate.Addendum{Layer: layer, History: v1.History{
		Created: v1.Time{Time: epoch}, CreatedBy: "mkimage: " + BinaryPath,
	}})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", arch, v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{"/" + BinaryPath}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":  "ambit",
		"org.opencontainers.image.source": "https://github.com/ambitmesh/ambit",
	}
	return mutate.ConfigFile(img, cf)
}

// oneFile is a tar of one file and the directories above it.
func oneFile(path string, data []byte, mode int64) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := []string{}
	for d := filepath.Dir(path); d != "."; d = filepath.Dir(d) {
		dirs = append([]string{d}, dirs...)
	}
	for _, d := range dirs {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// tarDir writes dir's files to out in name order, timestamps fixed.
func tarDir(dir, out string) error {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(paths)
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	werr := func() error {
		for _, p := range paths {
			rel, _ := filepath.Rel(dir, p)
			fi, err := os.Stat(p)
			if err != nil {
				return err
			}
			h := &tar.Header{Name: filepath.ToSlash(rel), Mode: 0o644, ModTime: epoch, Format: tar.FormatPAX}
			if fi.IsDir() {
				h.Typeflag, h.Name, h.Mode = tar.TypeDir, h.Name+"/", 0o755
				if err := tw.WriteHeader(h); err != nil {
					return err
				}
				continue
			}
			h.Typeflag, h.Size = tar.TypeReg, fi.Size()
			if err := tw.WriteHeader(h); err != nil {
				return err
			}
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			if err != nil {
				return err
			}
		}
		return tw.Close()
	}()
	if err := errors.Join(werr, f.Close()); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", out, err)
	}
	return os.Rename(tmp, out)
}
