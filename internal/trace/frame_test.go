package trace

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// gopacket is the reference here (tests only, so it stays out of the
// binary): frames it builds must read the same with decodeTCP.

func buildFrame(t testing.TB, v6 bool, tcp *layers.TCP, payload []byte, vlan bool) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}}
	var ls []gopacket.SerializableLayer
	ls = append(ls, eth)
	next := layers.EthernetTypeIPv4
	if v6 {
		next = layers.EthernetTypeIPv6
	}
	if vlan {
		eth.EthernetType = layers.EthernetTypeDot1Q
		ls = append(ls, &layers.Dot1Q{VLANIdentifier: 7, Type: next})
	} else {
		eth.EthernetType = next
	}
	if v6 {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP,
			SrcIP: net.ParseIP("fd00::2"), DstIP: net.ParseIP("fd00::3")}
		tcp.SetNetworkLayerForChecksum(ip)
		ls = append(ls, ip)
	} else {
		ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolTCP,
			SrcIP: net.IPv4(10, 244, 0, 2), DstIP: net.IPv4(10, 244, 1, 3)}
		tcp.SetNetworkLayerForChecksum(ip)
		ls = append(ls, ip)
	}
	ls = append(ls, tcp, gopacket.Payload(payload))
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestDecodeTCPMatchesGopacket(t *testing.T) {
	for _, tc := range []struct {
		name     string
		v6, vlan bool
		tcp      layers.TCP
		payload  string
	}{
		{"syn", false, false, layers.TCP{SrcPort: 43210, DstPort: 15001, SYN: true, Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{5, 0xb4}}}}, ""},
		{"http", false, false, layers.TCP{SrcPort: 43210, DstPort: 80, PSH: true, ACK: true}, "GET / HTTP/1.1\r\nHost: server\r\n\r\n"},
		{"fin over vlan", false, true, layers.TCP{SrcPort: 15008, DstPort: 40000, FIN: true, ACK: true}, ""},
		{"ipv6 tls", true, false, layers.TCP{SrcPort: 40000, DstPort: 15008, PSH: true, ACK: true}, "\x17\x03\x03\x00\x05hello"},
		{"rst", false, false, layers.TCP{SrcPort: 1, DstPort: 2, RST: true}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := buildFrame(t, tc.v6, &tc.tcp, []byte(tc.payload), tc.vlan)
			got, ok := decodeTCP(b)
			if !ok {
				t.Fatalf("decodeTCP refused a TCP frame: % x", b)
			}
			compareWithGopacket(t, b, got)
			if string(got.payload) != tc.payload {
				t.Errorf("payload %q, want %q", got.payload, tc.payload)
			}
		})
	}
}

// compareWithGopacket checks a decoded segment field by field against
// gopacket's reading of the same frame.
func compareWithGopacket(t testing.TB, b []byte, got segment) {
	t.Helper()
	pk := gopacket.NewPacket(b, layers.LayerTypeEthernet, gopacket.NoCopy)
	tcp, _ := pk.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if tcp == nil {
		t.Fatalf("gopacket finds no TCP in a frame decodeTCP read as %+v", got)
	}
	var src, dst net.IP
	if ip4, ok := pk.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
		src, dst = ip4.SrcIP, ip4.DstIP
	} else if ip6, ok := pk.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok {
		src, dst = ip6.SrcIP, ip6.DstIP
	}
	want := segment{sport: uint16(tcp.SrcPort), dport: uint16(tcp.DstPort), payload: tcp.Payload}
	want.src, _ = netip.AddrFromSlice(src)
	want.dst, _ = netip.AddrFromSlice(dst)
	want.src, want.dst = want.src.Unmap(), want.dst.Unmap()
	for _, f := range []struct {
		on  bool
		bit byte
	}{{tcp.FIN, flagFIN}, {tcp.SYN, flagSYN}, {tcp.RST, flagRST}, {tcp.PSH, flagPSH}, {tcp.ACK, flagACK}} {
		if f.on {
			want.flags |= f.bit
		}
	}
	if got.src != want.src || got.dst != want.dst || got.sport != want.sport || got.dport != want.dport ||
		got.flags&0x1f != want.flags || !bytes.Equal(got.payload, want.payload) {
		t.Errorf("decodeTCP %+v, gopacket %+v", got, want)
	}
}

func TestDecodeTCPRefuses(t *testing.T) {
	good := buildFrame(t, false, &layers.TCP{SrcPort: 1, DstPort: 2, ACK: true}, []byte("x"), false)
	for name, mut := range map[string]func([]byte) []byte{
		"short ethernet":         func(b []byte) []byte { return b[:13] },
		"arp":                    func(b []byte) []byte { b[12], b[13] = 0x08, 0x06; return b },
		"udp":                    func(b []byte) []byte { b[14+9] = 17; return b },
		"ip length past frame":   func(b []byte) []byte { b[14+2], b[14+3] = 0xff, 0xff; return b },
		"header length under 20": func(b []byte) []byte { b[14] = 0x44; return b },
		"later fragment":         func(b []byte) []byte { b[14+7] = 1; return b },
		"tcp offset past end":    func(b []byte) []byte { b[14+20+12] = 0xf0; return b },
		"truncated tcp":          func(b []byte) []byte { return b[:14+20+10] },
	} {
		b := mut(append([]byte(nil), good...))
		if s, ok := decodeTCP(b); ok {
			t.Errorf("%s: decoded %+v", name, s)
		}
	}
}

// FuzzDecodeTCP: any bytes, no panic, and whatever decodeTCP accepts,
// gopacket reads the same way.
func FuzzDecodeTCP(f *testing.F) {
	f.Add(buildFrame(f, false, &layers.TCP{SrcPort: 43210, DstPort: 80, PSH: true, ACK: true}, []byte("GET / HTTP/1.1\r\n\r\n"), false))
	f.Add(buildFrame(f, true, &layers.TCP{SrcPort: 1, DstPort: 15008, SYN: true}, nil, true))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, ok := decodeTCP(b)
		if !ok {
			return
		}
		if len(s.payload) > len(b) {
			t.Fatalf("payload longer than the frame")
		}
		pk := gopacket.NewPacket(b, layers.LayerTypeEthernet, gopacket.NoCopy)
		if pk.ErrorLayer() != nil {
			// gopacket is stricter in places (IPv4 options it cannot
			// parse, say); agreement is checked where both read the frame.
			return
		}
		compareWithGopacket(t, b, s)
	})
}

func TestWritePCAPReadsBack(t *testing.T) {
	start := time.Date(2026, 11, 26, 23, 0, 0, 123456000, time.UTC)
	pk := []Packet{
		{Time: start, Data: buildFrame(t, false, &layers.TCP{SrcPort: 1, DstPort: 2, SYN: true}, nil, false)},
		{Time: start.Add(1500 * time.Microsecond), Data: buildFrame(t, false, &layers.TCP{SrcPort: 1, DstPort: 2, PSH: true, ACK: true}, []byte("GET / HTTP/1.1\r\n\r\n"), false)},
	}
	path := filepath.Join(t.TempDir(), "x.pcap")
	if err := WritePCAP(path, pk); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatalf("gopacket's reader refuses the file: %v", err)
	}
	if r.LinkType() != layers.LinkTypeEthernet || r.Snaplen() != snapLen {
		t.Errorf("link type %v snaplen %d", r.LinkType(), r.Snaplen())
	}
	for i, want := range pk {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if !bytes.Equal(data, want.Data) || !ci.Timestamp.Equal(want.Time) || ci.Length != len(want.Data) {
			t.Errorf("packet %d: %d bytes at %v, want %d at %v", i, len(data), ci.Timestamp, len(want.Data), want.Time)
		}
	}
	if _, _, err := r.ReadPacketData(); err == nil {
		t.Error("a third packet in a file of two")
	}
	if got := Describe(pk[1], start); !strings.Contains(got, "10.244.0.2:1 > 10.244.1.3:2 [P.] len 18") || !strings.Contains(got, `"GET / HTTP/1.1" (plaintext)`) {
		t.Errorf("Describe: %q", got)
	}
	if !PlaintextHTTP(pk[1]) || PlaintextHTTP(pk[0]) {
		t.Error("PlaintextHTTP wrong")
	}
}
