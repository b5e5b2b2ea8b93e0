package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/relay"
	"github.com/ambitmesh/ambit/internal/testutil"
	istiohbone "istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"
)

// BenchmarkHop is one encrypted hop on loopback, three ways, in one run:
//
//	tls-relay  a TLS 1.3 client -> the bench's TLSRelay (server side) -> TCP
//	ambit      Ambit's HBONE Dialer -> Ambit's HBONE Server -> TCP
//	istio      Istio's Go HBONE (istio.io/istio/pkg/hbone) dialer -> its server -> TCP
//
// The client speaks through the tunnel to a plain TCP target behind the
// hop, as a node proxy's peer does. Each op moves 1 MiB; upload is client
// to target, download target to client. The same certificates (one CA,
// ECDSA P-256, TLS 1.3 AES-GCM) on every way.
func BenchmarkHop(b *testing.B) {
	ca := testutil.CA(b)
	target := hopTarget(b)
	for _, dir := range []struct {
		name string
		code byte
	}{{"upload", 'u'}, {"download", 'd'}} {
		b.Run("tls-relay/"+dir.name, func(b *testing.B) {
			addr := startTLSRelay(b, ca, target)
			cfg := relayTLS(testutil.Issue(b, ca, relayClientID), false)
			c, err := tls.Dial("tcp", addr, cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			runHop(b, c, dir.code)
		})
		b.Run("ambit/"+dir.name, func(b *testing.B) {
			st := ambitHop(b, ca, target)
			defer st.Close()
			runHop(b, st, dir.code)
		})
		b.Run("istio/"+dir.name, func(b *testing.B) {
			c := istioHop(b, ca, target)
			defer c.Close()
			runHop(b, c, dir.code)
		})
	}
}

const hopOp = 1 << 20

// hopTarget serves the bench protocol on plain TCP: a 9-byte header (the
// direction 'u' or 'd' and a length), then for an upload it reads that many
// bytes and answers one byte; for a download it writes that many bytes.
// Reads are of exact counts, so no half-close is needed (Istio's client
// conn, a net.Pipe, has none).
func hopTarget(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 32<<10)
				var hdr [9]byte
				for {
					if _, err := io.ReadFull(c, hdr[:]); err != nil {
						return
					}
					n := int64(binary.BigEndian.Uint64(hdr[1:]))
					if hdr[0] == 'u' {
						if _, err := io.CopyBuffer(io.Discard, io.LimitReader(c, n), buf); err != nil {
							return
						}
						if _, err := c.Write([]byte{1}); err != nil {
							return
						}
						continue
					}
					for n > 0 {
						m := min(n, int64(len(buf)))
						if _, err := c.Write(buf[:m]); err != nil {
							return
						}
						n -= m
					}
				}
			}()
		}
	}()
	return l.Addr().String()
}

// runHop moves b.N MiB one way over rw.
func runHop(b *testing.B, rw io.ReadWriter, dir byte) {
	b.SetBytes(hopOp)
	b.ReportAllocs()
	b.ResetTimer()
	n := int64(b.N) * hopOp
	var hdr [9]byte
	hdr[0] = dir
	binary.BigEndian.PutUint64(hdr[1:], uint64(n))
	if _, err := rw.Write(hdr[:]); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 32<<10)
	if dir == 'u' {
		for left := n; left > 0; {
			m := min(left, int64(len(buf)))
			if _, err := rw.Write(buf[:m]); err != nil {
				b.Fatal(err)
			}
			left -= m
		}
		if _, err := io.ReadFull(rw, buf[:1]); err != nil {
			b.Fatal(err)
		}
		return
	}
	if got, err := io.CopyBuffer(io.Discard, io.LimitReader(rw, n), buf); err != nil || got != n {
		b.Fatalf("downloaded %d of %d bytes: %v", got, n, err)
	}
}

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

func startTLSRelay(b *testing.B, ca *identity.CA, target string) string {
	return runRelay(b, &TLSRelay{Connect: target, Server: true, CA: ca, Log: quiet()})
}

// runRelay runs r on a free loopback port until the test ends and returns
// its address once it accepts.
func runRelay(tb testing.TB, r *TLSRelay) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	r.Listen = l.Addr().String()
	l.Close() // the relay listens itself; the port is free again on loopback
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Error(err)
		}
	})
	for range 200 {
		if c, err := net.Dial("tcp", r.Listen); err == nil {
			c.Close()
			return r.Listen
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("tls relay did not listen on %s", r.Listen)
	return ""
}

type certs map[identity.ID]*identity.Certificate

func (c certs) Get(_ context.Context, id identity.ID) (*identity.Certificate, error) {
	if cert := c[id]; cert != nil {
		return cert, nil
	}
	return nil, fmt.Errorf("no certificate for %s", id)
}

// ambitHop opens one stream through Ambit's HBONE server, which connects
// to the target and relays, as the node proxy's inbound does.
func ambitHop(b *testing.B, ca *identity.CA, target string) *hbone.Stream {
	srvCert, cliCert := testutil.Issue(b, ca, relayServerID), testutil.Issue(b, ca, relayClientID)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &hbone.Server{
		GetCertificate: func(context.Context, netip.Addr) (*identity.Certificate, error) { return srvCert, nil },
		Handler: hbone.HandlerFunc(func(ctx context.Context, r *hbone.ServerRequest) {
			var d net.Dialer
			up, err := d.DialContext(ctx, "tcp", r.Authority.String())
			if err != nil {
				_ = r.Reject(http.StatusServiceUnavailable, err.Error())
				return
			}
			defer up.Close()
			st, err := r.Accept(nil)
			if err != nil {
				return
			}
			defer st.Close()
			relay.Bidirectional(st, up.(*net.TCPConn))
		}),
		Log: quiet(),
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	d := &hbone.Dialer{Certs: certs{relayClientID: cliCert}, Log: quiet()}
	b.Cleanup(func() {
		d.Close()
		srv.Close()
		if err := <-done; !errors.Is(err, hbone.ErrServerClosed) {
			b.Error(err)
		}
	})
	st, err := d.Dial(context.Background(), hbone.Request{
		Source: relayClientID, Expected: []identity.ID{relayServerID},
		Address: netip.MustParseAddrPort(l.Addr().String()), Authority: netip.MustParseAddrPort(target),
	})
	if err != nil {
		b.Fatal(err)
	}
	return st
}

// istioHop opens one connection through Istio's Go HBONE: its dialer (an
// http2.Transport) to its server (net/http with HTTP/2 over TLS), which
// dials the target. Only the TLS set-up is the bench's: the same certificates
// and checks as the other ways.
func istioHop(b *testing.B, ca *identity.CA, target string) net.Conn {
	if s := istiolog.FindScope("hbone"); s != nil {
		s.SetOutputLevel(istiolog.ErrorLevel) // it logs every connection at info
	}
	srvCfg := relayTLS(testutil.Issue(b, ca, relayServerID), true)
	srvCfg.NextProtos = []string{"h2"}
	cliCfg := relayTLS(testutil.Issue(b, ca, relayClientID), false)
	cliCfg.NextProtos = []string{"h2"}
	srv := istiohbone.NewServer()
	srv.TLSConfig = srvCfg
	srv.Protocols.SetHTTP2(true) // its server speaks h2c by default; HBONE is h2 over TLS
	srv.ErrorLog = nil
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(l, "", "") }()
	b.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			b.Error(err)
		}
	})
	d := istiohbone.NewDialer(istiohbone.Config{ProxyAddress: l.Addr().String(), TLS: cliCfg})
	c, err := d.DialContext(context.Background(), "tcp", target)
	if err != nil {
		b.Fatal(err)
	}
	return c
}
