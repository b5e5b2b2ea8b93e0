package hbone

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

func TestParseAuthority(t *testing.T) {
	good := map[string]string{
		"10.244.1.3:80":         "10.244.1.3:80",
		"[2001:db8::1]:15008":   "[2001:db8::1]:15008",
		"[::1]:65535":           "[::1]:65535",
		"[2001:db8:0::1]:1":     "[2001:db8::1]:1", // accepted, normalized
		"[::ffff:1.2.3.4]:8080": "[::ffff:1.2.3.4]:8080",
	}
	for in, want := range good {
		got, err := ParseAuthority(in)
		if err != nil || got.String() != want {
			t.Errorf("ParseAuthority(%q) = %v, %v; want %s", in, got, err, want)
		}
	}
	bad := []string{"", "10.244.1.3", "10.244.1.3:", ":80", "10.244.1.3:0", "10.244.1.3:65536",
		"10.244.1.3:080", "10.244.1.3:+80", "10.244.1.3:8 0", "2001:db8::1:80", "[10.0.0.1]:80",
		"[::1%eth0]:80", "[::1:80", "host.example:80", "010.244.1.3:80", "10.244.1.3:80 ", " 10.244.1.3:80"}
	for _, in := range bad {
		if got, err := ParseAuthority(in); err == nil {
			t.Errorf("ParseAuthority(%q) = %v, want an error", in, got)
		}
	}
}

func TestForwarded(t *testing.T) {
	cases := map[string][]Forwarded{
		`for="10.244.0.2:35888"`:                                     {{For: "10.244.0.2:35888"}},
		`for="10.244.0.2:35888";host=echo.default.svc.cluster.local`: {{For: "10.244.0.2:35888", Host: "echo.default.svc.cluster.local"}},
		`For=192.0.2.60;proto=http;by=203.0.113.43`:                  {{For: "192.0.2.60", Proto: "http", By: "203.0.113.43"}},
		`for=a, for="[2001:db8::1]:4711"`:                            {{For: "a"}, {For: "[2001:db8::1]:4711"}},
		`for="a\"b"`:                                                 {{For: `a"b`}},
	}
	for in, want := range cases {
		got, err := ParseForwarded(in)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("ParseForwarded(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "for", "for=", `for="unterminated`, "for=a;for=b", "for=a;;", "for=a,", `for="a\`, "for=a b", "=x", "for=\"\x01\""} {
		if got, err := ParseForwarded(in); err == nil {
			t.Errorf("ParseForwarded(%q) = %+v, want an error", in, got)
		}
	}
	f := Forwarded{For: "10.244.0.2:35888", Host: "echo.default.svc.cluster.local"}
	if s := f.String(); s != `for="10.244.0.2:35888";host=echo.default.svc.cluster.local` {
		t.Errorf("String = %s", s)
	}
	if ap, err := ForwardedFor(f.String()); err != nil || ap != netip.MustParseAddrPort("10.244.0.2:35888") {
		t.Errorf("ForwardedFor = %v, %v", ap, err)
	}
}

func TestBaggage(t *testing.T) {
	b := Baggage{
		{Key: "k8s.cluster.name", Value: "Kubernetes"},
		{Key: "k8s.namespace.name", Value: "default"},
		{Key: "k8s.deployment.name", Value: "client"},
		{Key: "service.name", Value: "client app"},
		{Key: "service.version", Value: ""}, // omitted
	}
	s := b.String()
	if s != "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client,service.name=client%20app" {
		t.Errorf("String = %s", s)
	}
	back, err := ParseBaggage(s)
	if err != nil || back.Get("service.name") != "client app" || len(back) != 4 {
		t.Errorf("ParseBaggage = %+v, %v", back, err)
	}
	if p, err := ParseBaggage(" a = 1 ; prop=x , b=2"); err != nil || p.Get("a") != "1" || p[0].Properties != "prop=x" {
		t.Errorf("ws and properties: %+v %v", p, err)
	}
	// Only what the grammar needs is escaped ('%', ',', space, non-ASCII), so
	// a value that parsed formats no longer than it came: 8,000 '!' read
	// within the 8192-byte limit and, as url.PathEscape wrote them (%21),
	// came back three times too long to read again.
	if s := (Baggage{{Key: "v", Value: "a!(b)%,c d\xff"}}).String(); s != "v=a!(b)%25%2Cc%20d%FF" {
		t.Errorf("escaped value = %s", s)
	}
	long := "k=" + strings.Repeat("!", maxBaggageBytes-2)
	if p, err := ParseBaggage(long); err != nil || len(p.String()) != len(long) {
		t.Errorf("ParseBaggage(%d bytes of '!') = %v; formats to %d bytes", len(long), err, len(p.String()))
	} else if _, err := ParseBaggage(p.String()); err != nil {
		t.Errorf("read back: %v", err)
	}
	for _, in := range []string{"a", "=1", "a=1,,b=2", "a b=1", "a=%zz", "a=\"q\"", string(bytes.Repeat([]byte("a=1,"), 3000))} {
		if got, err := ParseBaggage(in); err == nil {
			t.Errorf("ParseBaggage(%.40q) = %+v, want an error", in, got)
		}
	}
}

func TestTraceparent(t *testing.T) {
	tp := NewTraceparent()
	p, err := ParseTraceparent(tp)
	if err != nil || p.Version != 0 || p.Flags != 0 {
		t.Fatalf("ParseTraceparent(%q) = %+v, %v", tp, p, err)
	}
	if NewTraceparent() == tp {
		t.Error("traceparent is not random")
	}
	for _, in := range []string{
		"", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
		"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
		"00-00000000000000000000000000000000-b7ad6b7169203331-01",
		"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
		"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
		"00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	} {
		if _, err := ParseTraceparent(in); err == nil {
			t.Errorf("ParseTraceparent(%q) accepted", in)
		}
	}
	if _, err := ParseTraceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future"); err != nil {
		t.Errorf("a later version with extra fields: %v", err)
	}
}

func FuzzParseAuthority(f *testing.F) {
	for _, s := range []string{"10.244.1.3:80", "[2001:db8::1]:15008", "[::1%eth0]:80", "1.2.3.4:080"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := ParseAuthority(s)
		if err != nil {
			return
		}
		if !ap.IsValid() || ap.Port() == 0 || ap.Addr().Zone() != "" {
			t.Fatalf("ParseAuthority(%q) = %v", s, ap)
		}
		// The canonical form parses to the same address.
		again, err := ParseAuthority(ap.String())
		if err != nil || again != ap {
			t.Fatalf("canonical %q of %q: %v %v", ap.String(), s, again, err)
		}
	})
}

func FuzzParseForwarded(f *testing.F) {
	for _, s := range []string{`for="10.244.0.2:35888";host=echo.default.svc.cluster.local`, `for=a, for="b\"c"`, `proto=http;by=x`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		els, err := ParseForwarded(s)
		if err != nil {
			return
		}
		// Formatting what parsed and parsing it again is lossless.
		var parts []string
		for _, e := range els {
			parts = append(parts, e.String())
		}
		for i, p := range parts {
			if p == "" {
				return // an element of only unknown parameters formats to nothing
			}
			again, err := ParseForwarded(p)
			if err != nil || len(again) != 1 || again[0] != els[i] {
				t.Fatalf("%q: element %d %+v formats as %q which parses as %+v, %v", s, i, els[i], p, again, err)
			}
		}
	})
}

func FuzzParseBaggage(f *testing.F) {
	for _, s := range []string{"k8s.namespace.name=default,service.name=client%20app", "a=1;p=2", "a=%41", "a=" + strings.Repeat("!", 3000)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := ParseBaggage(s)
		if err != nil {
			return
		}
		if len(b) > maxBaggageMembers {
			t.Fatalf("%d members", len(b))
		}
		var kept Baggage
		for _, m := range b {
			if m.Value != "" {
				kept = append(kept, m)
			}
		}
		again, err := ParseBaggage(b.String())
		if err != nil || len(again) != len(kept) {
			t.Fatalf("%q formats as %q which parses as %+v, %v", s, b.String(), again, err)
		}
		for i := range kept {
			if again[i].Key != kept[i].Key || again[i].Value != kept[i].Value {
				t.Fatalf("%q: member %d %+v became %+v", s, i, kept[i], again[i])
			}
		}
	})
}

func FuzzParseTraceparent(f *testing.F) {
	f.Add("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	f.Add(NewTraceparent())
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseTraceparent(s)
		if err != nil {
			return
		}
		if p.TraceID == [16]byte{} || p.SpanID == [8]byte{} || p.Version == 0xff {
			t.Fatalf("accepted %q as %+v", s, p)
		}
	})
}

// FuzzServerFrames feeds arbitrary bytes after the preface and a valid
// SETTINGS to the server side of a connection: whatever a peer sends, the
// connection must end or go on without a panic or a hang.
func FuzzServerFrames(f *testing.F) {
	seed := func(build func(fr *http2.Framer)) []byte {
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		build(fr)
		return buf.Bytes()
	}
	f.Add(seed(func(fr *http2.Framer) {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}, EndHeaders: true})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(0, 1000)
		fr.WritePing(false, [8]byte{1})
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
	}))
	f.Add(seed(func(fr *http2.Framer) {
		fr.WriteData(3, true, []byte("idle stream"))
	}))
	f.Add(seed(func(fr *http2.Framer) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
	}))
	f.Add(seed(func(fr *http2.Framer) { fr.WriteGoAway(0, http2.ErrCodeNo, nil) }))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		c := newConn(a, false, Config{}.withDefaults(true), slog.New(slog.DiscardHandler))
		c.newStream = func(_ context.Context, s *Stream) {
			s.respond(200, nil, "")
			io.Copy(io.Discard, s)
			s.Close()
		}
		c.start()
		go io.Copy(io.Discard, b) // whatever the server writes
		w := bufio.NewWriter(b)
		fr := http2.NewFramer(w, nil)
		fr.WriteSettings()
		w.Write(data)
		w.Flush()
		b.Close()
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end after the peer closed")
		}
		c.wait()
	})
}

// A traceparent and a Forwarded (with the client's port) are unique per
// stream: they go never indexed, so the HPACK tables on both sides keep
// only what repeats.
func TestUniqueHeadersAreNotIndexed(t *testing.T) {
	var buf bytes.Buffer
	enc := hpack.NewEncoder(&buf)
	dec := hpack.NewDecoder(4096, nil)
	var last int
	for i := range 50 {
		req := Request{Authority: netip.MustParseAddrPort("10.244.1.3:8080"), Header: http.Header{
			"Forwarded": {Forwarded{For: fmt.Sprintf("10.244.0.2:%d", 40000+i)}.String()},
			"Baggage":   {"k8s.namespace.name=default"},
		}}
		buf.Reset()
		for _, f := range requestFields(req) {
			if err := enc.WriteField(f); err != nil {
				t.Fatal(err)
			}
		}
		last = buf.Len()
		fields, err := dec.DecodeFull(buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, f := range fields {
			seen[f.Name] = true
			unique := f.Name == "traceparent" || f.Name == "forwarded"
			if f.Sensitive != unique {
				t.Fatalf("stream %d: %s sent never-indexed=%v, want %v", i, f.Name, f.Sensitive, unique)
			}
		}
		if !seen["traceparent"] || !seen["forwarded"] || !seen["baggage"] {
			t.Fatalf("stream %d: fields %v", i, fields)
		}
	}
	// What repeats is indexed: after the first stream, only the unique
	// literals (~100 bytes) go out, plus a byte per repeated field.
	if last > 110 {
		t.Errorf("the 50th CONNECT's header block is %d bytes; the repeating fields are not indexed", last)
	}
	// A caller's own traceparent goes the same way.
	req := Request{Authority: netip.MustParseAddrPort("10.244.1.3:8080"), Header: http.Header{"Traceparent": {NewTraceparent()}}}
	for _, f := range requestFields(req) {
		if f.Name == "traceparent" && !f.Sensitive {
			t.Error("a caller's traceparent would be indexed")
		}
	}
}
