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
	"strings"
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

// The cluster tests build their pods' image (tools/testapp) with the same
// tool: -path puts the binary elsewhere and -title names it; and istio-cni's
// image (kubetest.IstioCNIImage), whose -add files are its plugin and the
// host's nft with its libraries. Ambit's own image has no -add.

// epoch is every timestamp in the image: reproducible builds.
var epoch = time.Unix(0, 0).UTC()

func main() {
	bin := flag.String("binary", "bin/ambit", "the static ambit binary")
	out := flag.String("out", "bin/ambit-image.tar", "the OCI layout tar to write")
	ref := flag.String("ref", "ambitmesh/ambit:dev", "the image's name (index.json annotations)")
	arch := flag.String("arch", runtime.GOARCH, "the binary's architecture")
	path := flag.String("path", BinaryPath, "where the image holds the binary (its entrypoint)")
	title := flag.String("title", "ambit", "the image's org.opencontainers.image.title")
	var extra extraFlag
	flag.Var(&extra, "add", "SRC=DST: one more file in the image (repeatable; a test image's helper binaries and their libraries)")
	flag.Parse()
	digest, err := Write(Spec{Binary: *bin, Path: *path, Title: *title, Arch: *arch, Extra: extra}, *out, *ref)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
	fmt.Printf("%s: %s %s\n", *out, *ref, digest)
}

// Spec is what goes in an image: one binary at Path, its entrypoint.
type Spec struct {
	Binary string // the static binary on disk
	Path   string // where the image holds it, without a leading slash; default BinaryPath
	Title  string // org.opencontainers.image.title; default "ambit"
	Arch   string // default runtime.GOARCH
	// Extra files, for the cluster tests' images of Istio's components
	// (istio-cni's agent runs nft, a dynamic binary, with its libraries).
	// Ambit's own image has none.
	Extra []File
}

// File is one more file of an image: Src on disk (symlinks followed) at
// Dst in the image.
type File struct{ Src, Dst string }

type extraFlag []File

func (e *extraFlag) String() string { return fmt.Sprint(*e) }
func (e *extraFlag) Set(v string) error {
	src, dst, ok := strings.Cut(v, "=")
	if !ok || src == "" || dst == "" {
		return fmt.Errorf("%q: want SRC=DST", v)
	}
	*e = append(*e, File{Src: src, Dst: strings.TrimPrefix(dst, "/")})
	return nil
}

func (s Spec) fill() Spec {
	if s.Path == "" {
		s.Path = BinaryPath
	}
	s.Path = strings.TrimPrefix(s.Path, "/")
	if s.Title == "" {
		s.Title = "ambit"
	}
	if s.Arch == "" {
		s.Arch = runtime.GOARCH
	}
	return s
}

// Write builds the image and writes it to out as an OCI layout tar named
// ref; it returns the manifest's digest.
func Write(spec Spec, out, ref string) (v1.Hash, error) {
	img, err := Image(spec)
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
		"io.containerd.image.name":          fullName(ref),
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return v1.Hash{}, fmt.Errorf("oci layout: %w", err)
	}
	if err := tarDir(dir, out); err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

// fullName is ref as containerd names it: a bare name (ambitmesh/ambit:dev)
// is Docker Hub's, as `docker pull` would take it; a name that starts with
// a registry host (registry.k8s.io/pause:3.10) is kept.
func fullName(ref string) string {
	first, _, found := strings.Cut(ref, "/")
	if found && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return ref
	}
	return "docker.io/" + ref
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
func Image(spec Spec) (v1.Image, error) {
	spec = spec.fill()
	binary := spec.Binary
	data, err := os.ReadFile(binary)
	if err != nil {
		return nil, err
	}
	if len(data) < 4 || !bytes.Equal(data[:4], []byte("\x7fELF")) {
		return nil, fmt.Errorf("%s is not an ELF binary", binary)
	}
	entries := []entry{{spec.Path, data, 0o755}}
	for _, f := range spec.Extra {
		b, err := os.ReadFile(f.Src)
		if err != nil {
			return nil, err
		}
		st, err := os.Stat(f.Src)
		if err != nil {
			return nil, err
		}
		entries = append(entries, entry{f.Dst, b, int64(st.Mode().Perm())})
	}
	layerTar, err := files(entries)
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
		Created: v1.Time{Time: epoch}, CreatedBy: "mkimage: " + spec.Path,
	}})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Created = "linux", spec.Arch, v1.Time{Time: epoch}
	cf.Config.Entrypoint = []string{"/" + spec.Path}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":  spec.Title,
		"org.opencontainers.image.source": "https://github.com/ambitmesh/ambit",
	}
	return mutate.ConfigFile(img, cf)
}

// entry is one file of a layer.
type entry struct {
	path string
	data []byte
	mode int64
}

// files is a tar of the files and the directories above them, each once.
func files(es []entry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	made := map[string]bool{}
	for _, e := range es {
		dirs := []string{}
		for d := filepath.Dir(e.path); d != "." && d != "/"; d = filepath.Dir(d) {
			dirs = append([]string{d}, dirs...)
		}
		for _, d := range dirs {
			if made[d] {
				continue
			}
			made[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: e.path, Mode: e.mode, Size: int64(len(e.data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
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
