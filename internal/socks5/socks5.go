// Package socks5 is the server side of the SOCKS5 handshake (RFC 1928) as
// the node proxy offers it on 15080: no authentication, CONNECT only, to an
// IPv4, IPv6 or domain-name destination. It reads and writes the protocol;
// what to connect to is the caller's business.
package socks5

import (
	"bufio"
	"fmt"
	"io"
	"net/netip"
	"strconv"
)

// Reply codes (RFC 1928 section 6).
const (
	Succeeded           byte = 0x00
	GeneralFailure      byte = 0x01
	NotAllowed          byte = 0x02
	NetworkUnreachable  byte = 0x03
	HostUnreachable     byte = 0x04
	ConnectionRefused   byte = 0x05
	CommandNotSupported byte = 0x07
	AddressNotSupported byte = 0x08
)

// Request is the destination a client asked for: an address, or a name
// (then Addr is invalid) with a port.
type Request struct {
	Addr netip.AddrPort
	Host string
	Port uint16
}

func (r Request) String() string {
	if r.Host != "" {
		return r.Host + ":" + strconv.Itoa(int(r.Port))
	}
	return r.Addr.String()
}

// Error is a handshake failure; Reply is what to answer, if anything can be.
type Error struct {
	Reply byte
	Msg   string
}

func (e *Error) Error() string { return "socks5: " + e.Msg }

// Handshake reads the greeting and the request from r and answers the
// greeting on w. On a request it cannot serve it answers with the reply
// code itself and returns an *Error. The caller then connects and calls
// WriteReply.
func Handshake(r *bufio.Reader, w io.Writer) (Request, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Request{}, fmt.Errorf("socks5: greeting: %w", err)
	}
	if hdr[0] != 5 {
		return Request{}, &Error{Msg: fmt.Sprintf("version %d, want 5", hdr[0])}
	}
	if hdr[1] == 0 {
		return Request{}, &Error{Msg: "no authentication methods offered"}
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return Request{}, fmt.Errorf("socks5: methods: %w", err)
	}
	noAuth := false
	for _, m := range methods {
		noAuth = noAuth || m == 0
	}
	if !noAuth {
		w.Write([]byte{5, 0xff})
		return Request{}, &Error{Msg: "client does not offer 'no authentication'"}
	}
	if _, err := w.Write([]byte{5, 0}); err != nil {
		return Request{}, fmt.Errorf("socks5: %w", err)
	}
	var req [4]byte
	if _, err := io.ReadFull(r, req[:]); err != nil {
		return Request{}, fmt.Errorf("socks5: request: %w", err)
	}
	if req[0] != 5 {
		return Request{}, &Error{Msg: fmt.Sprintf("request version %d, want 5", req[0])}
	}
	var out Request
	switch req[3] {
	case 1, 4:
		n := 4
		if req[3] == 4 {
			n = 16
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return Request{}, fmt.Errorf("socks5: address: %w", err)
		}
		ip, _ := netip.AddrFromSlice(buf[:n])
		out.Addr = netip.AddrPortFrom(ip.Unmap(), uint16(buf[n])<<8|uint16(buf[n+1]))
		out.Port = out.Addr.Port()
	case 3:
		l, err := r.ReadByte()
		if err != nil {
			return Request{}, fmt.Errorf("socks5: name length: %w", err)
		}
		buf := make([]byte, int(l)+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return Request{}, fmt.Errorf("socks5: name: %w", err)
		}
		out.Host = string(buf[:l])
		out.Port = uint16(buf[l])<<8 | uint16(buf[l+1])
		if ip, err := netip.ParseAddr(out.Host); err == nil { // a literal written as a name
			out.Addr, out.Host = netip.AddrPortFrom(ip.Unmap(), out.Port), ""
		} else if !validHost(out.Host) {
			WriteReply(w, AddressNotSupported, netip.AddrPort{})
			return Request{}, &Error{Reply: AddressNotSupported, Msg: fmt.Sprintf("invalid host name %q", out.Host)}
		}
	default:
		WriteReply(w, AddressNotSupported, netip.AddrPort{})
		return Request{}, &Error{Reply: AddressNotSupported, Msg: fmt.Sprintf("address type %d", req[3])}
	}
	if req[1] != 1 {
		WriteReply(w, CommandNotSupported, netip.AddrPort{})
		return Request{}, &Error{Reply: CommandNotSupported, Msg: fmt.Sprintf("command %d: only CONNECT is supported", req[1])}
	}
	if out.Port == 0 {
		WriteReply(w, AddressNotSupported, netip.AddrPort{})
		return Request{}, &Error{Reply: AddressNotSupported, Msg: "port 0"}
	}
	return out, nil
}

func validHost(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// WriteReply answers the request; bind is the address the proxy connected
// from (zero if none).
func WriteReply(w io.Writer, code byte, bind netip.AddrPort) error {
	b := []byte{5, code, 0}
	ip := bind.Addr()
	switch {
	case ip.Is4():
		a := ip.As4()
		b = append(b, 1)
		b = append(b, a[:]...)
	case ip.Is6():
		a := ip.As16()
		b = append(b, 4)
		b = append(b, a[:]...)
	default:
		b = append(b, 1, 0, 0, 0, 0)
	}
	b = append(b, byte(bind.Port()>>8), byte(bind.Port()))
	_, err := w.Write(b)
	return err
}
