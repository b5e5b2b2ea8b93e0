package socks5

import (
	"bufio"
	"bytes"
	"net/netip"
	"testing"
)

func run(in []byte) (Request, []byte, error) {
	var out bytes.Buffer
	req, err := Handshake(bufio.NewReader(bytes.NewReader(in)), &out)
	return req, out.Bytes(), err
}

func TestHandshake(t *testing.T) {
	greet := []byte{5, 2, 2, 0}
	cases := []struct {
		name string
		req  []byte
		want string
	}{
		{"ipv4", []byte{5, 1, 0, 1, 10, 244, 1, 3, 0, 80}, "10.244.1.3:80"},
		{"ipv6", append(append([]byte{5, 1, 0, 4}, netip.MustParseAddr("2001:db8::1").AsSlice()...), 0x1f, 0x90), "[2001:db8::1]:8080"},
		{"name", append(append([]byte{5, 1, 0, 3, 30}, "echo.default.svc.cluster.local"...), 0, 80), "echo.default.svc.cluster.local:80"},
		{"literal as name", append(append([]byte{5, 1, 0, 3, 9}, "127.0.0.1"...), 0, 80), "127.0.0.1:80"},
	}
	for _, tc := range cases {
		req, out, err := run(append(append([]byte{}, greet...), tc.req...))
		if err != nil || req.String() != tc.want || !bytes.Equal(out, []byte{5, 0}) {
			t.Errorf("%s: %v %q %v", tc.name, req, out, err)
		}
	}
}

func TestHandshakeRefusals(t *testing.T) {
	cases := []struct {
		name  string
		in    []byte
		reply []byte // what the client must read back (after the method choice)
	}{
		{"socks4", []byte{4, 1, 0, 80, 10, 0, 0, 1, 0}, nil},
		{"auth only", []byte{5, 1, 2}, []byte{5, 0xff}},
		{"bind command", []byte{5, 1, 0, 5, 2, 0, 1, 10, 0, 0, 1, 0, 80}, []byte{5, 0, 5, CommandNotSupported}},
		{"bad address type", []byte{5, 1, 0, 5, 1, 0, 9}, []byte{5, 0, 5, AddressNotSupported}},
		{"bad name", append(append([]byte{5, 1, 0, 5, 1, 0, 3, 5}, "a b c"...), 0, 80), []byte{5, 0, 5, AddressNotSupported}},
		{"port 0", []byte{5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 0}, []byte{5, 0, 5, AddressNotSupported}},
		{"truncated", []byte{5, 1, 0, 5, 1, 0, 1, 10}, []byte{5, 0}},
	}
	for _, tc := range cases {
		_, out, err := run(tc.in)
		if err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
		if tc.reply != nil && !bytes.HasPrefix(out, tc.reply) {
			t.Errorf("%s: answered %v, want %v...", tc.name, out, tc.reply)
		}
	}
}

func TestWriteReply(t *testing.T) {
	var b bytes.Buffer
	WriteReply(&b, Succeeded, netip.MustParseAddrPort("10.0.0.1:4242"))
	if !bytes.Equal(b.Bytes(), []byte{5, 0, 0, 1, 10, 0, 0, 1, 0x10, 0x92}) {
		t.Errorf("reply %v", b.Bytes())
	}
}

func FuzzHandshake(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 10, 244, 1, 3, 0, 80})
	f.Add(append(append([]byte{5, 1, 0, 5, 1, 0, 3, 4}, "echo"...), 0, 80))
	f.Fuzz(func(t *testing.T, in []byte) {
		req, _, err := run(in)
		if err == nil && (req.Port == 0 || (req.Host == "" && !req.Addr.IsValid())) {
			t.Fatalf("accepted a request with no destination: %+v", req)
		}
	})
}
