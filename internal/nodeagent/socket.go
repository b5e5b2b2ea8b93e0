package nodeagent

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
)

// ListenSocket listens on a Unix socket at path, replacing a stale one,
// and returns with it the cleanup to run on the way out: it removes the
// path only if it is still this socket. During a surge upgrade the new
// agent has bound its own socket at the same path by the time the old one
// exits; removing the path unconditionally (as Go's listener does on
// Close) would take the new agent's socket away from the proxies and the
// CNI plugin.
func ListenSocket(network, path string) (*net.UnixListener, func(), error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, err
	}
	_ = os.Remove(path) // a stale socket from an earlier run, or the old agent's in an upgrade
	l, err := net.ListenUnix(network, &net.UnixAddr{Name: path, Net: network})
	if err != nil {
		return nil, nil, fmt.Errorf("listen %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	mine, err := os.Stat(path)
	if err != nil {
		l.Close()
		return nil, nil, fmt.Errorf("listen %s: %w", path, err)
	}
	cleanup := func() {
		if cur, err := os.Stat(path); err == nil && os.SameFile(mine, cur) {
			_ = os.Remove(path)
		}
	}
	return l, cleanup, nil
}
