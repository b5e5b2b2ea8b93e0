package nodeagent

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

// In a surge upgrade the new agent binds the socket path while the old
// one still runs; the old one's exit must leave the new one's socket.
func TestOldAgentLeavesTheNewSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "ztunnel.sock")
	old, oldCleanup, err := ListenSocket("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	next, nextCleanup, err := ListenSocket("unix", path)
	if err != nil {
		t.Fatalf("the new agent cannot bind beside the old one: %v", err)
	}
	defer next.Close()
	old.Close()
	oldCleanup()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("after the old agent left, the socket path does not reach the new one: %v", err)
	}
	c.Close()
	if _, err := next.Accept(); err != nil {
		t.Fatal(err)
	}
	next.Close()
	nextCleanup()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("the last agent's socket is left behind: %v", err)
	}
}
