package capture

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/sockopt"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// testPod builds two namespaces joined by a veth pair, a "pod" (10.250.0.2)
// and a "peer" (10.250.0.3). The addresses exist only inside them; both
// namespaces (and so the veth) are deleted when the test ends, pass or fail.
func testPod(t *testing.T) (pod, peer netns.NsHandle) {
	t.Helper()
	pod, _ = testutil.Netns(t)
	peer, _ = testutil.Netns(t)
	testutil.Veth(t, pod, peer, "10.250.0.2/24", "10.250.0.3/24")
	return pod, peer
}

// listen opens a listener inside ns.
func listen(t *testing.T, ns netns.NsHandle, addr string) *net.TCPListener {
	t.Helper()
	var l net.Listener
	if err := nsutil.Do(ns, func() (err error) { l, err = net.Listen("tcp", addr); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// dial connects from inside ns, optionally with the proxy's mark.
func dial(t *testing.T, ns netns.NsHandle, addr string, mark int) error {
	t.Helper()
	return nsutil.Do(ns, func() error {
		d := net.Dialer{Timeout: 2 * time.Second}
		if mark != 0 {
			d.Control = func(_, _ string, c syscall.RawConn) error {
				var serr error
				c.Control(func(fd uintptr) { serr = sockopt.Mark(int(fd), mark) })
				return serr
			}
		}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return err
		}
		t.Cleanup(func() { c.Close() })
		return nil
	})
}

// accepted waits briefly for a connection on l and returns its original
// destination, or ok=false if none came.
func accepted(t *testing.T, l *net.TCPListener) (orig netip.AddrPort, ok bool) {
	t.Helper()
	l.SetDeadline(time.Now().Add(500 * time.Millisecond))
	c, err := l.AcceptTCP()
	if err != nil {
		return netip.AddrPort{}, false
	}
	defer c.Close()
	raw, _ := c.SyscallConn()
	raw.Control(func(fd uintptr) {
		if a, err := sockopt.OriginalDst(int(fd), false); err == nil {
			orig = a
		}
	})
	return orig, true
}

func TestRedirection(t *testing.T) {
	pod, peer := testPod(t)
	if err := Install(pod, Config{}); err != nil {
		t.Fatal(err)
	}
	if ok, err := Installed(pod); !ok || err != nil {
		t.Fatalf("Installed = %v, %v", ok, err)
	}
	out := listen(t, pod, fmt.Sprintf("0.0.0.0:%d", ambient.ZtunnelOutboundPort))
	in := listen(t, pod, fmt.Sprintf("0.0.0.0:%d", ambient.ZtunnelInboundPlaintextPort))
	hbone := listen(t, pod, fmt.Sprintf("0.0.0.0:%d", ambient.ZtunnelInboundPort))
	server := listen(t, peer, "10.250.0.3:8080")

	// 1. The pod's outbound TCP lands on 15001, with its original destination.
	if err := dial(t, pod, "10.250.0.3:8080", 0); err != nil {
		t.Fatal(err)
	}
	if orig, ok := accepted(t, out); !ok || orig != netip.MustParseAddrPort("10.250.0.3:8080") {
		t.Fatalf("outbound: captured=%v original=%v", ok, orig)
	}
	if _, ok := accepted(t, server); ok {
		t.Fatal("outbound: the peer got the connection directly")
	}
	// 2. The proxy's own (marked) sockets go out untouched.
	if err := dial(t, pod, "10.250.0.3:8080", ambient.InpodMark); err != nil {
		t.Fatal(err)
	}
	if _, ok := accepted(t, server); !ok {
		t.Fatal("marked: the peer did not get the proxy's connection")
	}
	// 3. Inbound TCP to the pod lands on 15006, with its original destination.
	if err := dial(t, peer, "10.250.0.2:80", 0); err != nil {
		t.Fatal(err)
	}
	if orig, ok := accepted(t, in); !ok || orig != netip.MustParseAddrPort("10.250.0.2:80") {
		t.Fatalf("inbound: captured=%v original=%v", ok, orig)
	}
	// 4. HBONE (15008) is not redirected.
	if err := dial(t, peer, fmt.Sprintf("10.250.0.2:%d", ambient.ZtunnelInboundPort), 0); err != nil {
		t.Fatal(err)
	}
	if _, ok := accepted(t, hbone); !ok {
		t.Fatal("HBONE: 15008 did not get the connection")
	}
	// The policy route for answers from the client's IP is in place.
	h, _ := netlink.NewHandleAt(pod)
	defer h.Close()
	if !hasRule(t, h) {
		t.Fatal("no ip rule for fwmark 0x111 -> table 100")
	}

	// 5. Removing the rules sends the pod's next connections direct.
	if err := Remove(pod, Config{}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := Installed(pod); ok {
		t.Fatal("table still there after Remove")
	}
	if hasRule(t, h) {
		t.Fatal("ip rule still there after Remove")
	}
	if err := dial(t, pod, "10.250.0.3:8080", 0); err != nil {
		t.Fatal(err)
	}
	if _, ok := accepted(t, server); !ok {
		t.Fatal("after Remove: the connection did not go direct")
	}
	if _, ok := accepted(t, out); ok {
		t.Fatal("after Remove: still captured")
	}
	// Install twice and Remove twice are fine.
	if err := Install(pod, Config{}); err != nil {
		t.Fatal(err)
	}
	if err := Install(pod, Config{}); err != nil {
		t.Fatalf("second Install: %v", err)
	}
	if err := Remove(pod, Config{}); err != nil {
		t.Fatal(err)
	}
	if err := Remove(pod, Config{}); err != nil {
		t.Fatalf("second Remove: %v", err)
	}
}

func hasRule(t *testing.T, h *netlink.Handle) bool {
	rules, err := h.RuleList(unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Table == 100 && r.Mark == 0x111 {
			return true
		}
	}
	return false
}

func TestCheck(t *testing.T) {
	testutil.NeedRoot(t)
	if err := Check(); err != nil {
		t.Fatalf("this kernel can capture (the other tests show it): %v", err)
	}
	if n, _ := filepath.Glob("/run/netns/ambit-probe-*"); len(n) != 0 {
		t.Fatalf("probe namespaces left: %v", n)
	}
}
