package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/ambitmesh/ambit/internal/sockopt"
	"golang.org/x/sys/unix"
)

// errNotRedirected is the answer for a connection that reached the port
// directly: the kernel has no original destination for it.
var errNotRedirected = errors.New("no original destination: the connection was not redirected to this port")

// originalDst returns where a redirected connection was going.
func originalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	var out netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		out, serr = sockopt.OriginalDst(int(fd), !local.Addr().Is4() && !local.Addr().Is4In6())
	})
	if err != nil {
		return netip.AddrPort{}, err
	}
	if errors.Is(serr, unix.ENOENT) {
		return netip.AddrPort{}, errNotRedirected
	}
	if serr != nil {
		return netip.AddrPort{}, fmt.Errorf("SO_ORIGINAL_DST: %w", serr)
	}
	return netip.AddrPortFrom(out.Addr().Unmap(), out.Port()), nil
}
