package config

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/workload"
)

func TestWatcherAppliesGoodAndKeepsLastGood(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mesh.yaml")
	write := func(s string) {
		t.Helper()
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil { // as editors and ConfigMaps do
			t.Fatal(err)
		}
	}
	one := "workloads:\n- {name: a, namespace: d, workloadIps: [\"10.0.0.1\"]}\n"
	two := one + "- {name: b, namespace: d, workloadIps: [\"10.0.0.2\"]}\n"
	write(one)
	applied := make(chan *workload.Index, 10)
	rejected := make(chan error, 10)
	w := &Watcher{Path: path, Interval: 20 * time.Millisecond, OnError: func(err error) { rejected <- err }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, func(ix *workload.Index) error { applied <- ix; return nil }) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if ix := <-applied; len(ix.Workloads()) != 1 {
		t.Fatal("initial load")
	}
	<-w.Synced()

	write(two)
	select {
	case ix := <-applied:
		if len(ix.Workloads()) != 2 {
			t.Fatalf("applied %d workloads, want 2", len(ix.Workloads()))
		}
	case <-time.After(3 * time.Second):
		t.Fatal("a good change was not applied")
	}
	write(strings.Replace(two, "name: b,", "name: b, colour: blue,", 1))
	select {
	case err := <-rejected:
		if !strings.Contains(err.Error(), "mesh.yaml:3:") || !strings.Contains(err.Error(), "colour: unknown field") {
			t.Errorf("rejection: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("a bad change was not reported")
	}
	select {
	case <-applied:
		t.Fatal("a bad change was applied")
	case <-time.After(100 * time.Millisecond):
	}
	write(one)
	select {
	case ix := <-applied:
		if len(ix.Workloads()) != 1 {
			t.Fatal("the fix was not applied")
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the fix was not applied")
	}
}

func TestLoadRefusesBadFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mesh.yaml")
	os.WriteFile(path, []byte("workloads: 3\n"), 0o644)
	w := &Watcher{Path: path}
	if _, err := w.Load(); err == nil || !strings.Contains(err.Error(), "mesh.yaml:1:12: workloads: want a list") {
		t.Fatalf("Load: %v", err)
	}
	err := w.Run(context.Background(), func(*workload.Index) error { t.Fatal("applied a bad file"); return nil })
	if err == nil || !strings.Contains(err.Error(), "mesh.yaml:1:12: workloads: want a list") {
		t.Fatalf("Run: %v", err)
	}
	select {
	case <-w.Synced():
		t.Fatal("synced on a bad file")
	default:
	}
}

// A first view its consumer refuses ends Run with the reason, file named.
func TestWatcherFirstApplyRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mesh.yaml")
	os.WriteFile(path, []byte("workloads:\n- {name: a, namespace: d, workloadIps: [\"10.0.0.1\"]}\n"), 0o644)
	w := &Watcher{Path: path}
	err := w.Run(context.Background(), func(*workload.Index) error { return errors.New("workload d/b is not in the config") })
	if err == nil || !strings.Contains(err.Error(), "mesh.yaml: workload d/b is not in the config") {
		t.Fatalf("Run: %v", err)
	}
}
