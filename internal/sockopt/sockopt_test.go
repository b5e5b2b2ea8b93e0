package sockopt

import (
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func socket(t *testing.T, family int) int {
	t.Helper()
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Skipf("socket(%d): %v", family, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func get(t *testing.T, fd, level, opt int) int {
	t.Helper()
	v, err := unix.GetsockoptInt(fd, level, opt)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestSetOptions(t *testing.T) {
	fd := socket(t, unix.AF_INET)
	if err := ReuseAddr(fd); err != nil || get(t, fd, unix.SOL_SOCKET, unix.SO_REUSEADDR) != 1 {
		t.Fatalf("ReuseAddr: %v", err)
	}
	if err := NoPortAtBind(fd); err != nil || get(t, fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT) != 1 {
		t.Fatalf("NoPortAtBind: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("SKIP: SO_MARK and IP_TRANSPARENT need CAP_NET_ADMIN (CI runs as root)")
	}
	if err := Mark(fd, 0x539); err != nil || get(t, fd, unix.SOL_SOCKET, unix.SO_MARK) != 0x539 {
		t.Fatalf("Mark: %v", err)
	}
	if err := Transparent(fd, false); err != nil || get(t, fd, unix.SOL_IP, unix.IP_TRANSPARENT) != 1 {
		t.Fatalf("Transparent v4: %v", err)
	}
	fd6 := socket(t, unix.AF_INET6)
	if err := Transparent(fd6, true); err != nil || get(t, fd6, unix.SOL_IPV6, unix.IPV6_TRANSPARENT) != 1 {
		t.Fatalf("Transparent v6: %v", err)
	}
}

// A connection that was not redirected has no original destination: ENOENT,
// and no allocation on the way (the proxy asks once per captured connection).
// capture's test reads a real one.
func TestOriginalDstNotRedirected(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f, err := s.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	if _, err := OriginalDst(fd, false); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("OriginalDst of a direct connection: %v, want ENOENT", err)
	}
	if n := testing.AllocsPerRun(100, func() { OriginalDst(fd, false) }); n != 0 {
		t.Fatalf("%v allocations per OriginalDst", n)
	}
}
