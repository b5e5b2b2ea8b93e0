package cni

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const bridgeList = `{
  "cniVersion": "1.0.0",
  "name": "k8s",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}}
  ]
}
`

func setup(t *testing.T) (*Installation, string) {
	t.Helper()
	dir := t.TempDir()
	conf, bin := filepath.Join(dir, "net.d"), filepath.Join(dir, "bin")
	for _, d := range []string{conf, bin} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	self := filepath.Join(dir, "ambit")
	if err := os.WriteFile(self, []byte("\x7fELF binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(conf, "10-bridge.conflist")
	if err := os.WriteFile(file, []byte(bridgeList), 0o644); err != nil {
		t.Fatal(err)
	}
	return &Installation{BinDir: bin, ConfDir: conf, Binary: self,
		Conf: Conf{AgentSocket: "/var/run/ambit/cni.sock", ExcludeNamespaces: []string{"kube-system"}}}, file
}

// TestInstallChainsAndUninstallRestores: the plugin goes last in the
// runtime's conflist, once however often Install runs; Uninstall puts the
// file back byte for byte and removes the binary.
func TestInstallChainsAndUninstallRestores(t *testing.T) {
	in, file := setup(t)
	for i := 0; i < 3; i++ {
		got, changed, err := in.Install()
		if err != nil {
			t.Fatal(err)
		}
		if got != file || changed != (i == 0) {
			t.Errorf("install %d: file %s changed %v; want %s, changed only the first time", i, got, changed, file)
		}
	}
	data, _ := os.ReadFile(file)
	if strings.Count(string(data), `"ambit-cni"`) != 1 || strings.Index(string(data), `"bridge"`) > strings.Index(string(data), `"ambit-cni"`) {
		t.Errorf("want ambit-cni once, after bridge:\n%s", data)
	}
	if ok, err := Installed(in.ConfDir); !ok || err != nil {
		t.Errorf("Installed: %v, %v", ok, err)
	}
	if b, err := os.ReadFile(filepath.Join(in.BinDir, PluginType)); err != nil || string(b) != "\x7fELF binary" {
		t.Errorf("the plugin's binary: %q, %v", b, err)
	}
	// A changed configuration is taken up again.
	in.Conf.ExcludeNamespaces = append(in.Conf.ExcludeNamespaces, "ambit-system")
	if _, changed, err := in.Install(); err != nil || !changed {
		t.Errorf("after a configuration change: changed %v, %v", changed, err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(file); string(data) != bridgeList {
		t.Errorf("after uninstall:\n%s\nwant, byte for byte:\n%s", data, bridgeList)
	}
	if _, err := os.Stat(filepath.Join(in.BinDir, PluginType)); !os.IsNotExist(err) {
		t.Errorf("the binary is still there: %v", err)
	}
	if entries, _ := os.ReadDir(in.ConfDir); len(entries) != 1 {
		t.Errorf("files left in the configuration directory: %v", entries)
	}
}

// TestUninstallKeepsOthersChanges: a conflist the node's own plugin
// rewrote since is not put back; only ambit-cni's entry goes.
func TestUninstallKeepsOthersChanges(t *testing.T) {
	in, file := setup(t)
	if _, _, err := in.Install(); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(file)
	changed := strings.Replace(string(data), `"cni0"`, `"cni1"`, 1)
	if err := os.WriteFile(file, []byte(changed), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := in.Uninstall(); err != nil {
		t.Fatal(err)
	}
	data, _ = os.ReadFile(file)
	if strings.Contains(string(data), "ambit-cni") || !strings.Contains(string(data), `"cni1"`) {
		t.Errorf("after uninstall:\n%s", data)
	}
}

// TestInstallRefusals: no configuration, a single-plugin .conf, a broken
// file: each a clear error naming the file, nothing written.
func TestInstallRefusals(t *testing.T) {
	in, file := setup(t)
	os.Remove(file)
	if _, _, err := in.Install(); err == nil || !strings.Contains(err.Error(), "no network configuration") {
		t.Errorf("empty directory: %v", err)
	}
	single := filepath.Join(in.ConfDir, "10-bridge.conf")
	os.WriteFile(single, []byte(`{"cniVersion": "1.0.0", "name": "k8s", "type": "bridge"}`), 0o644)
	if _, _, err := in.Install(); err == nil || !strings.Contains(err.Error(), "single-plugin") {
		t.Errorf("a .conf: %v", err)
	}
	os.Remove(single)
	os.WriteFile(file, []byte(`{"plugins": [`), 0o644)
	if _, _, err := in.Install(); err == nil || !strings.Contains(err.Error(), file) {
		t.Errorf("a broken conflist: %v", err)
	}
	if data, _ := os.ReadFile(file); string(data) != `{"plugins": [` {
		t.Errorf("a broken conflist was rewritten: %q", data)
	}
}
