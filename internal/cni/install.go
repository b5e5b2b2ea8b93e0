package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
)

// Installation is what the node agent puts on its node: the plugin's
// binary in the CNI binary directory, and the plugin chained last into
// the node's network configuration (the first conflist in name order,
// the one the runtime uses, as libcni picks it).
type Installation struct {
	BinDir  string // /opt/cni/bin
	ConfDir string // /etc/cni/net.d
	Binary  string // the executable to install as ambit-cni (the agent's own)
	Conf    Conf   // the plugin's entry; Type is set to PluginType
}

// backupName is where Install keeps a conflist's bytes as it found them,
// so Uninstall can put them back exactly. Not a CNI extension: the
// runtime ignores it.
func backupName(conflist string) string {
	return filepath.Join(filepath.Dir(conflist), "."+filepath.Base(conflist)+".ambit-orig")
}

// Conflist finds the file the runtime uses: the first, by name, of the
// CNI configuration files in dir (libcni's extensions).
func Conflist(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("cni: %w", err)
	}
	var names []string
	for _, e := range entries {
		if ext := filepath.Ext(e.Name()); !e.IsDir() && (ext == ".conflist" || ext == ".conf" || ext == ".json") {
			names = append(names, e.Name())
		}
	}
	if len(names) == 0 {
		return "", fmt.Errorf("cni: no network configuration in %s yet (is the node's network plugin installed?)", dir)
	}
	slices.Sort(names)
	return filepath.Join(dir, names[0]), nil
}

// Install copies the binary (when it differs) and chains the plugin into
// the node's conflist (when it is not there as configured). It is
// idempotent: the agent calls it at start and again whenever it checks.
// It returns the conflist's path and whether it changed anything.
func (in *Installation) Install() (string, bool, error) {
	changedBin, err := in.installBinary()
	if err != nil {
		return "", false, err
	}
	file, err := Conflist(in.ConfDir)
	if err != nil {
		return "", false, err
	}
	if ext := filepath.Ext(file); ext != ".conflist" {
		return file, false, fmt.Errorf("cni: %s is a single-plugin configuration (%s); ambit-cni chains only into a .conflist", file, ext)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return file, false, fmt.Errorf("cni: %w", err)
	}
	doc, plugins, err := decodeConflist(file, data)
	if err != nil {
		return file, false, err
	}
	// The plugin's own keys only (the list's cniVersion and name are its).
	entry, err := json.Marshal(struct {
		Type              string     `json:"type"`
		AgentSocket       string     `json:"agentSocket,omitempty"`
		ExcludeNamespaces []string   `json:"excludeNamespaces,omitempty"`
		Kubernetes        *APIAccess `json:"kubernetes,omitempty"`
		FailOpen          bool       `json:"failOpen,omitempty"`
	}{PluginType, in.Conf.AgentSocket, in.Conf.ExcludeNamespaces, in.Conf.Kubernetes, in.Conf.FailOpen})
	if err != nil {
		return file, false, err
	}
	kept := withoutPlugin(plugins)
	if len(kept) == len(plugins)-1 && jsonEqual(plugins[len(plugins)-1], entry) {
		return file, changedBin, nil // chained last, as configured
	}
	if len(kept) == len(plugins) {
		// First install into this file: keep its bytes for Uninstall.
		if err := writeAtomic(backupName(file), data, 0o600); err != nil {
			return file, false, err
		}
	}
	out, err := encodeConflist(doc, append(kept, entry))
	if err != nil {
		return file, false, err
	}
	if err := writeAtomic(file, out, 0o644); err != nil {
		return file, false, err
	}
	return file, true, nil
}

// Uninstall takes the plugin out of every conflist in the directory
// (restoring a file's original bytes when nothing else changed it since)
// and removes the binary.
func (in *Installation) Uninstall() error {
	entries, err := os.ReadDir(in.ConfDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cni: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if filepath.Ext(e.Name()) != ".conflist" {
			continue
		}
		file := filepath.Join(in.ConfDir, e.Name())
		if err := uninstallFrom(file); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(filepath.Join(in.BinDir, PluginType)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("cni: %w", err))
	}
	return errors.Join(errs...)
}

func uninstallFrom(file string) error {
	data, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("cni: %w", err)
	}
	doc, plugins, err := decodeConflist(file, data)
	if err != nil {
		return err
	}
	kept := withoutPlugin(plugins)
	backup := backupName(file)
	if len(kept) == len(plugins) {
		os.Remove(backup) // nothing of ours in it
		return nil
	}
	out, err := encodeConflist(doc, kept)
	if err != nil {
		return err
	}
	if orig, err := os.ReadFile(backup); err == nil && jsonEqual(orig, out) {
		out = orig // as it was, byte for byte
	}
	if err := writeAtomic(file, out, 0o644); err != nil {
		return err
	}
	os.Remove(backup)
	return nil
}

// Installed reports whether the plugin is chained into the runtime's
// conflist in dir.
func Installed(dir string) (bool, error) {
	file, err := Conflist(dir)
	if err != nil {
		return false, err
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return false, err
	}
	_, plugins, err := decodeConflist(file, data)
	if err != nil {
		return false, err
	}
	return len(withoutPlugin(plugins)) < len(plugins), nil
}

func (in *Installation) installBinary() (bool, error) {
	src, err := os.ReadFile(in.Binary)
	if err != nil {
		return false, fmt.Errorf("cni: the plugin's binary: %w", err)
	}
	dst := filepath.Join(in.BinDir, PluginType)
	if cur, err := os.ReadFile(dst); err == nil && bytes.Equal(cur, src) {
		return false, nil
	}
	if err := writeAtomic(dst, src, 0o755); err != nil {
		return false, err
	}
	return true, nil
}

func decodeConflist(file string, data []byte) (map[string]json.RawMessage, []json.RawMessage, error) {
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, nil, fmt.Errorf("cni: %s: %w", file, err)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(doc["plugins"], &plugins); err != nil || len(plugins) == 0 {
		return nil, nil, fmt.Errorf("cni: %s: no \"plugins\" list (%v)", file, err)
	}
	return doc, plugins, nil
}

func encodeConflist(doc map[string]json.RawMessage, plugins []json.RawMessage) ([]byte, error) {
	list, err := json.Marshal(plugins)
	if err != nil {
		return nil, err
	}
	out := map[string]json.RawMessage{}
	for k, v := range doc {
		out[k] = v
	}
	out["plugins"] = list
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// withoutPlugin drops ambit-cni's entries.
func withoutPlugin(plugins []json.RawMessage) []json.RawMessage {
	var kept []json.RawMessage
	for _, p := range plugins {
		var t struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(p, &t) == nil && t.Type == PluginType {
			continue
		}
		kept = append(kept, p)
	}
	return kept
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	ja, _ := json.Marshal(x)
	jb, _ := json.Marshal(y)
	return bytes.Equal(ja, jb)
}

// writeAtomic replaces file with data: a runtime reading the directory
// sees the old file or the new one, never half of one. The temporary name
// has no CNI extension.
func writeAtomic(file string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(file), "."+filepath.Base(file)+".tmp*")
	if err != nil {
		return fmt.Errorf("cni: %w", err)
	}
	_, werr := io.Copy(tmp, bytes.NewReader(data))
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr, os.Chmod(tmp.Name(), mode)); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("cni: writing %s: %w", file, err)
	}
	if err := os.Rename(tmp.Name(), file); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("cni: %w", err)
	}
	return nil
}
