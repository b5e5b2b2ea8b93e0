// Package trace shows what happens to a connection's packets: it captures
// on interfaces inside the lab's namespaces (AF_PACKET, no libpcap), writes
// one pcap file per hop that Wireshark opens, and prints tcpdump-like lines.
package trace

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Packet is one captured frame.
type Packet struct {
	Time time.Time
	Data []byte
}

// Capture records every frame on one interface of one namespace.
type Capture struct {
	stopOnce sync.Once // Stop may be called again; it returns the same packets
	iface    string
	fd       int
	stop     chan struct{}
	done     chan struct{}

	mu      sync.Mutex
	packets []Packet
}

// Start opens a packet socket on iface inside ns and records until Stop.
func Start(ns netns.NsHandle, iface string) (*Capture, error) {
	c := &Capture{iface: iface, fd: -1, stop: make(chan struct{}), done: make(chan struct{})}
	err := nsutil.Do(ns, func() error {
		ifi, err := net.InterfaceByName(iface)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind to %s: %w", iface, err)
		}
		tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		c.fd = fd
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("trace: capture on %s: %w", iface, err)
	}
	go c.loop()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *Capture) loop() {
	defer close(c.done)
	buf := make([]byte, snapLen)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		// On loopback every frame is seen leaving and arriving; keep one.
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING && c.iface == "lo" {
			continue
		}
		c.mu.Lock()
		c.packets = append(c.packets, Packet{Time: time.Now(), Data: append([]byte(nil), buf[:n]...)})
		c.mu.Unlock()
	}
}

// Stop ends the capture and returns what it saw.
func (c *Capture) Stop() []Packet {
	c.stopOnce.Do(func() {
		close(c.stop)
		<-c.done
		unix.Close(c.fd)
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.packets
}

// WritePCAP writes packets as a pcap file of Ethernet frames (the classic
// format: microsecond stamps, little-endian), which Wireshark and tcpdump
// read.
func WritePCAP(path string, packets []Packet) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	var hdr [24]byte
	binary.LittleEndian.PutUint32(hdr[0:], 0xa1b2c3d4) // magic: microseconds
	binary.LittleEndian.PutUint16(hdr[4:], 2)          // version 2.4
	binary.LittleEndian.PutUint16(hdr[6:], 4)
	binary.LittleEndian.PutUint32(hdr[16:], snapLen)
	binary.LittleEndian.PutUint32(hdr[20:], 1) // link type: Ethernet
	w.Write(hdr[:])
	for _, p := range packets {
		var rec [16]byte
		binary.LittleEndian.PutUint32(rec[0:], uint32(p.Time.Unix()))
		binary.LittleEndian.PutUint32(rec[4:], uint32(p.Time.Nanosecond()/1000))
		binary.LittleEndian.PutUint32(rec[8:], uint32(len(p.Data)))
		binary.LittleEndian.PutUint32(rec[12:], uint32(len(p.Data)))
		w.Write(rec[:])
		w.Write(p.Data)
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

// snapLen is the largest frame a capture keeps (its receive buffer).
const snapLen = 65536

// TCP keeps the TCP packets among those captured.
func TCP(packets []Packet) []Packet {
	var out []Packet
	for _, p := range packets {
		if _, ok := decodeTCP(p.Data); ok {
			out = append(out, p)
		}
	}
	return out
}

// Describe renders a packet the way tcpdump would, plus what its payload
// is: plaintext HTTP (the first line) or TLS (the record type).
func Describe(p Packet, start time.Time) string {
	at := fmt.Sprintf("%9.3fms", float64(p.Time.Sub(start).Microseconds())/1000)
	s, ok := decodeTCP(p.Data)
	if !ok {
		return at + "  (not TCP)"
	}
	var flags []string
	for _, f := range []struct {
		bit  byte
		name string
	}{{flagSYN, "S"}, {flagFIN, "F"}, {flagRST, "R"}, {flagPSH, "P"}, {flagACK, "."}} {
		if s.flags&f.bit != 0 {
			flags = append(flags, f.name)
		}
	}
	line := fmt.Sprintf("%s  %s > %s [%s] len %d", at, netip.AddrPortFrom(s.src, s.sport), netip.AddrPortFrom(s.dst, s.dport), strings.Join(flags, ""), len(s.payload))
	if k := payloadKind(s.payload); k != "" {
		line += "  " + k
	}
	return line
}

// PlaintextHTTP reports whether a packet carries readable HTTP.
func PlaintextHTTP(p Packet) bool {
	s, ok := decodeTCP(p.Data)
	if !ok {
		return false
	}
	return strings.HasPrefix(string(s.payload), "GET ") || strings.HasPrefix(string(s.payload), "POST ") || strings.HasPrefix(string(s.payload), "HTTP/1.")
}

func payloadKind(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	s := string(b)
	for _, pre := range []string{"GET ", "POST ", "PUT ", "HEAD ", "HTTP/1."} {
		if strings.HasPrefix(s, pre) {
			first, _, _ := strings.Cut(s, "\r\n")
			return fmt.Sprintf("%q (plaintext)", first)
		}
	}
	if len(b) >= 5 && b[1] == 3 {
		switch b[0] {
		case 22:
			return "TLS handshake"
		case 23:
			return "TLS application data (encrypted)"
		case 21:
			return "TLS alert"
		case 20:
			return "TLS change cipher spec"
		}
	}
	return ""
}
