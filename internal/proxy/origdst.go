package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST): the destination a connection
// had before the kernel redirected it to this listener.
const soOriginalDst = 80

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
		if local.Addr().Is4() || local.Addr().Is4In6() {
			var sa unix.RawSockaddrInet4
			size := uint32(unsafe.Sizeof(sa))
			serr = getsockopt(int(fd), unix.SOL_IP, soOriginalDst, unsafe.Pointer(&sa), &size)
			if serr == nil {
				out = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:]))
			}
			return
		}
		var sa unix.RawSockaddrInet6
		size := uint32(unsafe.Sizeof(sa))
		serr = getsockopt(int(fd), unix.SOL_IPV6, soOriginalDst, unsafe.Pointer(&sa), &size)
		if serr == nil {
			out = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:]))
		}
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

func getsockopt(fd, level, name int, val unsafe.Pointer, size *uint32) error {
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(val), uintptr(unsafe.Pointer(size)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}
