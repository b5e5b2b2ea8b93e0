package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// untar extracts an OCI layout tar into a directory.
func untar(t *testing.T, file string) string {
	t.Helper()
	dir := t.TempDir()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return dir
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		if h.Typeflag == tar.TypeDir {
			if err := os.MkdirAll(p, 0o755); err != nil {
				t.Fatal(err)
			}
			continue
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestImageHoldsTheBinaryAndNothingElse reads the written tar back with
// go-containerregistry's OCI layout reader: one image named as asked, OCI
// media types, linux and the architecture, the entrypoint, one layer with
// exactly the binary (same bytes, 0755) and its directories; the same
// binary gives the same digest twice.
func TestImageHoldsTheBinaryAndNothingElse(t *testing.T) {
	bin, err := os.Executable() // an ELF binary at hand: this test's
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "image.tar")
	d1, err := Write(Spec{Binary: bin, Arch: "amd64"}, out, "ambitmesh/ambit:test")
	if err != nil {
		t.Fatal(err)
	}
	first, _ := os.ReadFile(out)
	d2, err := Write(Spec{Binary: bin, Arch: "amd64"}, out, "ambitmesh/ambit:test")
	if err != nil {
		t.Fatal(err)
	}
	second, _ := os.ReadFile(out)
	if d1 != d2 || !bytes.Equal(first, second) {
		t.Errorf("two builds of one binary differ: %s, %s (tar equal: %v)", d1, d2, bytes.Equal(first, second))
	}

	idx, err := layout.ImageIndexFromPath(untar(t, out))
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("%d manifests, want 1", len(im.Manifests))
	}
	desc := im.Manifests[0]
	if desc.Digest != d1 || desc.MediaType != types.OCIManifestSchema1 ||
		desc.Annotations["io.containerd.image.name"] != "docker.io/ambitmesh/ambit:test" || desc.Annotations["org.opencontainers.image.ref.name"] != "test" {
		t.Errorf("index entry: %+v", desc)
	}
	img, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "amd64" || strings.Join(cf.Config.Entrypoint, " ") != "/usr/local/bin/ambit" || !cf.Created.Time.Equal(epoch) {
		t.Errorf("config: os %s arch %s entrypoint %v created %v", cf.OS, cf.Architecture, cf.Config.Entrypoint, cf.Created)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	if mt, _ := layers[0].MediaType(); mt != types.OCILayer {
		t.Errorf("layer media type %s", mt)
	}
	names, files := layerFiles(t, img)
	if f := files[BinaryPath]; !bytes.Equal(f.data, want) || f.mode != 0o755 {
		t.Errorf("%s: %d bytes mode %o, want the binary's %d bytes, 0755", BinaryPath, len(f.data), f.mode, len(want))
	}
	if strings.Join(names, " ") != "usr/ usr/local/ usr/local/bin/ usr/local/bin/ambit" {
		t.Errorf("layer holds %v; want the binary and its directories only (no shell)", names)
	}
}

// TestImageRefusesWhatIsNotABinary: a file that is not ELF (a script, say)
// is not put in an image that has no shell to run it.
func TestImageRefusesWhatIsNotABinary(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ambit")
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho hi\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(Spec{Binary: p}, filepath.Join(t.TempDir(), "x.tar"), "a:b"); err == nil || !strings.Contains(err.Error(), "not an ELF binary") {
		t.Errorf("a script: %v", err)
	}
	if _, err := Write(Spec{Binary: filepath.Join(t.TempDir(), "absent")}, filepath.Join(t.TempDir(), "x.tar"), "a:b"); err == nil {
		t.Error("an absent binary: no error")
	}
}

// TestFullName: a bare name is Docker Hub's (as `docker pull` takes it); a
// name starting with a registry host is kept, so the test cluster's pause
// image is found under the name containerd's config gives.
func TestFullName(t *testing.T) {
	for ref, want := range map[string]string{
		"ambitmesh/ambit:dev":        "docker.io/ambitmesh/ambit:dev",
		"busybox:1":                  "docker.io/busybox:1",
		"registry.k8s.io/pause:3.10": "registry.k8s.io/pause:3.10",
		"localhost:5000/a/b:c":       "localhost:5000/a/b:c",
		"localhost/a:b":              "localhost/a:b",
		"ambit.test/testapp:dev":     "ambit.test/testapp:dev",
	} {
		if got := fullName(ref); got != want {
			t.Errorf("fullName(%q) = %q, want %q", ref, got, want)
		}
	}
}

// TestImageWithExtraFiles: a test image of Istio's components carries a
// few more files (a plugin, a dynamic binary's libraries), each once with
// its directories, its mode kept.
func TestImageWithExtraFiles(t *testing.T) {
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	lib := filepath.Join(t.TempDir(), "libx.so.1")
	if err := os.WriteFile(lib, []byte("library"), 0o644); err != nil {
		t.Fatal(err)
	}
	var e extraFlag
	for _, v := range []string{bin + "=opt/cni/bin/plugin", lib + "=/usr/lib/x86_64-linux-gnu/libx.so.1"} {
		if err := e.Set(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Set("no-destination"); err == nil {
		t.Error("-add without =DST was taken")
	}
	img, err := Image(Spec{Binary: bin, Path: "usr/local/bin/install-cni", Arch: "amd64", Extra: e})
	if err != nil {
		t.Fatal(err)
	}
	names, files := layerFiles(t, img)
	if f := files["usr/lib/x86_64-linux-gnu/libx.so.1"]; string(f.data) != "library" || f.mode != 0o644 {
		t.Errorf("the library: %q mode %o", f.data, f.mode)
	}
	want := "usr/ usr/local/ usr/local/bin/ usr/local/bin/install-cni opt/ opt/cni/ opt/cni/bin/ opt/cni/bin/plugin usr/lib/ usr/lib/x86_64-linux-gnu/ usr/lib/x86_64-linux-gnu/libx.so.1"
	if strings.Join(names, " ") != want {
		t.Errorf("layer holds\n%v\nwant\n%s", names, want)
	}
}

// layerFiles reads the image's one layer: the names in order, and each
// regular file's bytes and mode.
func layerFiles(t *testing.T, img v1.Image) ([]string, map[string]entry) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	files := map[string]entry{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names, files
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Typeflag == tar.TypeReg {
			b, _ := io.ReadAll(tr)
			files[h.Name] = entry{h.Name, b, h.Mode}
		}
	}
}
