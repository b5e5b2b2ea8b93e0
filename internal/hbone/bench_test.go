package hbone

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/ambitmesh/ambit/internal/identity"
)

// The throughput benchmarks move the same bytes over four transports on
// loopback, in one run, so their ratios mean something on a noisy machine:
//
//	tcp      plain TCP (the ceiling)
//	tls      one TLS 1.3 connection, AES-GCM (the crypto limit)
//	hbone-1  one HBONE stream: TLS + HTTP/2 framing and flow control
//	hbone-8  eight HBONE streams sharing one connection
//
// Each op moves 1 MiB; -benchtime sets how many. "upload" is client to
// server, "download" server to client. Every transport runs the same tiny
// protocol: the client sends a byte 'u' or 'd' and an 8-byte length; for an
// upload it then sends that many bytes and the server answers one byte
// after reading them all; for a download the server sends that many bytes.

const (
	benchOp    = 1 << 20
	benchChunk = 32 << 10 // what io.Copy uses
)

type halfCloser interface {
	io.ReadWriter
	CloseWrite() error
}

// serveBench is the server side of the protocol, on any transport.
func serveBench(rw halfCloser) {
	var hdr [9]byte
	if _, err := io.ReadFull(rw, hdr[:]); err != nil {
		return
	}
	n := int64(binary.BigEndian.Uint64(hdr[1:]))
	buf := make([]byte, benchChunk)
	switch hdr[0] {
	case 'u':
		if _, err := io.CopyBuffer(io.Discard, io.LimitReader(rw, n), buf); err != nil {
			return
		}
		rw.Write([]byte{1})
	case 'd':
		for n > 0 {
			m := min(n, int64(len(buf)))
			if _, err := rw.Write(buf[:m]); err != nil {
				return
			}
			n -= m
		}
	}
	rw.CloseWrite()
}

// clientBench moves n bytes in the given direction and waits for the end.
func clientBench(rw halfCloser, dir byte, n int64) error {
	var hdr [9]byte
	hdr[0] = dir
	binary.BigEndian.PutUint64(hdr[1:], uint64(n))
	if _, err := rw.Write(hdr[:]); err != nil {
		return err
	}
	buf := make([]byte, benchChunk)
	if dir == 'u' {
		for left := n; left > 0; {
			m := min(left, int64(len(buf)))
			if _, err := rw.Write(buf[:m]); err != nil {
				return err
			}
			left -= m
		}
		var ack [1]byte
		_, err := io.ReadFull(rw, ack[:])
		return err
	}
	got, err := io.CopyBuffer(io.Discard, rw, buf)
	if err != nil {
		return err
	}
	if got != n {
		return fmt.Errorf("downloaded %d of %d bytes", got, n)
	}
	return nil
}

// listenBench serves the protocol on each loopback connection, after wrap
// (e.g. a TLS handshake).
func listenBench(b *testing.B, wrap func(net.Conn) halfCloser) netip.AddrPort {
	return serveTCP(b, func(c net.Conn) { serveBench(wrap(c)) })
}

type benchEnv struct {
	ca    *identity.CA
	certs *identity.Manager
}

func newBenchEnv(b *testing.B) *benchEnv {
	ca := newCA(b)
	return &benchEnv{ca: ca, certs: newManager(b, ca, 0)}
}

func (e *benchEnv) cert(b *testing.B, id identity.ID) *identity.Certificate {
	c, err := e.certs.Get(context.Background(), id)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

func BenchmarkThroughput(b *testing.B) {
	env := newBenchEnv(b)
	for _, dir := range []struct {
		name string
		code byte
	}{{"upload", 'u'}, {"download", 'd'}} {
		b.Run("tcp/"+dir.name, func(b *testing.B) {
			addr := listenBench(b, func(c net.Conn) halfCloser { return c.(*net.TCPConn) })
			c, err := net.Dial("tcp", addr.String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			runBench(b, []halfCloser{c.(*net.TCPConn)}, dir.code)
		})
		b.Run("tls/"+dir.name, func(b *testing.B) {
			srvCfg := serverTLS(env.cert(b, serverID))
			addr := listenBench(b, func(c net.Conn) halfCloser { return tls.Server(c, srvCfg) })
			c, err := tls.Dial("tcp", addr.String(), clientTLS(env.cert(b, clientID), []identity.ID{serverID}))
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			runBench(b, []halfCloser{c}, dir.code)
		})
		for _, streams := range []int{1, 8} {
			b.Run(fmt.Sprintf("hbone-%d/%s", streams, dir.name), func(b *testing.B) {
				srv := startServer(b, env.certs, serverID, HandlerFunc(func(ctx context.Context, r *ServerRequest) {
					st, err := r.Accept(nil)
					if err == nil {
						serveBench(st)
					}
				}), Config{})
				d := newDialer(b, env.certs, Config{})
				sts := make([]halfCloser, streams)
				for i := range sts {
					st, err := d.Dial(context.Background(), request(srv.addr, netip.MustParseAddrPort("127.0.0.1:9")))
					if err != nil {
						b.Fatal(err)
					}
					defer st.Close()
					sts[i] = st
				}
				want := 1
				if streams > spreadAt {
					want = spreadConns
				}
				if got, _ := d.Stats(); got != want {
					b.Fatalf("%d connections for %d streams, want %d", got, streams, want)
				}
				runBench(b, sts, dir.code)
			})
		}
	}
}

// runBench moves b.N MiB over one halfCloser, or split evenly over several
// streams running at once.
func runBench(b *testing.B, list []halfCloser, dir byte) {
	b.SetBytes(benchOp)
	b.ReportAllocs()
	b.ResetTimer()
	total := int64(b.N) * benchOp
	per := total / int64(len(list))
	var wg sync.WaitGroup
	errs := make(chan error, len(list))
	for _, c := range list {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- clientBench(c, dir, per)
		}()
	}
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
}
