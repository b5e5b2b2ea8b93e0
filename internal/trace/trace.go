// Package trace shows what happens to a connection's packets: it captures
// on interfaces inside the lab's namespaces (AF_PACKET, no libpcap), writes
// one pcap file per hop that Wireshark opens, and prints tcpdump-like lines.
package trace

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
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
	iface string
	fd    int
	stop  chan struct{}
	done  chan struct{}

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
	buf := make([]byte, 65536)
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
	close(c.stop)
	<-c.done
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.packets
}

// WritePCAP writes packets as a pcap file of Ethernet frames.
func WritePCAP(path string, packets []Packet) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := pcapgo.NewWriter(f)
	if err := w.WriteFileHeader(65536, layers.LinkTypeEthernet); err != nil {
		f.Close()
		return err
	}
	for _, p := range packets {
		ci := gopacket.CaptureInfo{Timestamp: p.Time, CaptureLength: len(p.Data), Length: len(p.Data)}
		if err := w.WritePacket(ci, p.Data); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// TCP keeps the TCP packets among those captured.
func TCP(packets []Packet) []Packet {
	var out []Packet
	for _, p := range packets {
		pk := gopacket.NewPacket(p.Data, layers.LayerTypeEthernet, gopacket.NoCopy)
		if pk.Layer(layers.LayerTypeTCP) != nil {
			out = append(out, p)
		}
	}
	return out
}

// Describe renders a packet the way tcpdump would, plus what its payload
// is: plaintext HTTP (the first line) or TLS (the record type).
func Describe(p Packet, start time.Time) string {
	pk := gopacket.NewPacket(p.Data, layers.LayerTypeEthernet, gopacket.NoCopy)
	ip4, _ := pk.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
	tcp, _ := pk.Layer(layers.LayerTypeTCP).(*layers.TCP)
	at := fmt.Sprintf("%9.3fms", float64(p.Time.Sub(start).Microseconds())/1000)
	if ip4 == nil || tcp == nil {
		return at + "  (not TCP/IPv4)"
	}
	var flags []string
	for _, f := range []struct {
		on   bool
		name string
	}{{tcp.SYN, "S"}, {tcp.FIN, "F"}, {tcp.RST, "R"}, {tcp.PSH, "P"}, {tcp.ACK, "."}} {
		if f.on {
			flags = append(flags, f.name)
		}
	}
	line := fmt.Sprintf("%s  %s:%d > %s:%d [%s] len %d", at, ip4.SrcIP, tcp.SrcPort, ip4.DstIP, tcp.DstPort, strings.Join(flags, ""), len(tcp.Payload))
	if s := payloadKind(tcp.Payload); s != "" {
		line += "  " + s
	}
	return line
}

// PlaintextHTTP reports whether a packet carries readable HTTP.
func PlaintextHTTP(p Packet) bool {
	pk := gopacket.NewPacket(p.Data, layers.LayerTypeEthernet, gopacket.NoCopy)
	tcp, _ := pk.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if tcp == nil {
		return false
	}
	s := string(tcp.Payload)
	return strings.HasPrefix(s, "GET ") || strings.HasPrefix(s, "POST ") || strings.HasPrefix(s, "HTTP/1.")
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
