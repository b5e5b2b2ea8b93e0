// Package sockopt holds the socket options Ambit sets and reads, on raw
// descriptors (from a RawConn's Control, or a socket made with
// socket(2)): the proxy's mark, transparency, address reuse, the port
// chosen at connect, and the original destination of a redirected
// connection. Each returns the kernel's error as it is (no wrapping, so
// a best-effort caller that ignores it allocates nothing); callers say
// which option failed.
package sockopt

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Mark sets SO_MARK (needs CAP_NET_ADMIN).
func Mark(fd, mark int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark)
}

// Transparent sets IP_TRANSPARENT, or IPV6_TRANSPARENT on an IPv6 socket:
// the socket may bind an address that is not local (needs CAP_NET_ADMIN).
func Transparent(fd int, v6 bool) error {
	level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
	if v6 {
		level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
	}
	return unix.SetsockoptInt(fd, level, opt, 1)
}

// ReuseAddr sets SO_REUSEADDR.
func ReuseAddr(fd int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
}

// ReusePort lets several sockets listen on one address and port
// (SO_REUSEPORT; the kernel spreads new connections over them): an
// upgrading node proxy opens a pod's listeners beside the old proxy's.
// Both must set it, and be of the same user.
func ReusePort(fd int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
}

// NoPortAtBind leaves the choice of a socket's local port from bind to
// connect (IP_BIND_ADDRESS_NO_PORT). A bind to (address, 0) must find a
// port free for any destination, searching the ephemeral range against
// every socket bound to that address, live or in TIME_WAIT: a node proxy
// dials applications from the client's IP, thousands of times from one
// address. Measured right after a previous 10,000-connection run, a bind
// took 47 ms (median), each blocking a thread until the runtime started
// another. At connect the port need only be unique for the four-tuple.
// Kernels without the option keep the old behaviour.
func NoPortAtBind(fd int) error {
	return unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
}

// OriginalDst reads SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST at SOL_IPV6 on
// an IPv6 socket, the same number; x/sys names only the first): where a
// connection was going before the kernel redirected it to this socket.
// ENOENT: it was not redirected.
func OriginalDst(fd int, v6 bool) (netip.AddrPort, error) {
	if !v6 {
		var sa unix.RawSockaddrInet4
		size := uint32(unsafe.Sizeof(sa))
		if err := getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), &size); err != nil {
			return netip.AddrPort{}, err
		}
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])), nil
	}
	var sa unix.RawSockaddrInet6
	size := uint32(unsafe.Sizeof(sa))
	if err := getsockopt(fd, unix.SOL_IPV6, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), &size); err != nil {
		return netip.AddrPort{}, err
	}
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])), nil
}

// getsockopt is getsockopt(2) into a struct, which x/sys/unix has no
// general form for.
func getsockopt(fd, level, name int, val unsafe.Pointer, size *uint32) error {
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name), uintptr(val), uintptr(unsafe.Pointer(size)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}
