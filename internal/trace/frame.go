package trace

import (
	"encoding/binary"
	"net/netip"
)

// The hop view needs five fields of a captured frame, so it reads them
// itself instead of linking a packet library into every ambit process:
// gopacket's layers package fills ~6 MB of tables at start-up, which the
// node proxy would carry as resident memory for nothing.

// TCP flag bits, as in the header's thirteenth byte.
const (
	flagFIN = 1 << 0
	flagSYN = 1 << 1
	flagRST = 1 << 2
	flagPSH = 1 << 3
	flagACK = 1 << 4
)

// segment is what the hop view reads of a TCP segment in an Ethernet frame.
type segment struct {
	src, dst     netip.Addr
	sport, dport uint16
	flags        byte
	payload      []byte // aliases the frame
}

// decodeTCP reads an Ethernet II frame (802.1Q tags allowed) carrying
// IPv4 or IPv6 and a TCP segment. It reports false for anything else, for
// an IP fragment (TCP here sends whole segments), and for any length that runs past the
// frame: input is whatever crossed the wire, so no length is trusted.
func decodeTCP(b []byte) (segment, bool) {
	var s segment
	if len(b) < 14 {
		return s, false
	}
	etype, off := binary.BigEndian.Uint16(b[12:14]), 14
	for etype == 0x8100 || etype == 0x88a8 { // VLAN tags
		if len(b) < off+4 {
			return s, false
		}
		etype, off = binary.BigEndian.Uint16(b[off+2:off+4]), off+4
	}
	ip := b[off:]
	var l4 []byte
	switch etype {
	case 0x0800:
		if len(ip) < 20 || ip[0]>>4 != 4 {
			return s, false
		}
		hl, total := int(ip[0]&0x0f)*4, int(binary.BigEndian.Uint16(ip[2:4]))
		if hl < 20 || total < hl || total > len(ip) {
			return s, false
		}
		if ip[9] != 6 || binary.BigEndian.Uint16(ip[6:8])&0x3fff != 0 { // not TCP, or a fragment (MF or an offset)
			return s, false
		}
		s.src, s.dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = ip[hl:total] // the frame may be padded past the IP packet
	case 0x86dd:
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return s, false
		}
		plen := int(binary.BigEndian.Uint16(ip[4:6]))
		if ip[6] != 6 || 40+plen > len(ip) { // TCP right after the fixed header only
			return s, false
		}
		s.src, s.dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = ip[40 : 40+plen]
	default:
		return s, false
	}
	if len(l4) < 20 {
		return s, false
	}
	doff := int(l4[12]>>4) * 4
	if doff < 20 || doff > len(l4) {
		return s, false
	}
	s.sport, s.dport = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
	s.flags = l4[13]
	s.payload = l4[doff:]
	return s, true
}
