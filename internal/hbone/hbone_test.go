package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/testutil"
	"golang.org/x/net/http2"
)

func TestRoundTrip(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	var got atomic.Pointer[ServerRequest]
	h := HandlerFunc(func(ctx context.Context, r *ServerRequest) {
		got.Store(r)
		relayHandler().ServeHBONE(ctx, r)
	})
	srv := startServer(t, m, serverID, h, Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})

	req := request(srv.addr, echo)
	req.Header = http.Header{
		"Forwarded": {`for="127.0.0.1:40000"`},
		"Baggage":   {Baggage{{Key: "k8s.namespace.name", Value: "default"}}.String()},
	}
	st, err := d.Dial(ctxT(t), req)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	msg := []byte("GET / HTTP/1.1\r\nHost: 10.244.1.3\r\n\r\n")
	if _, err := st.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := st.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	back, err := io.ReadAll(st)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, msg) {
		t.Fatalf("echo = %q, want %q", back, msg)
	}
	info := st.Info()
	if info.TLSVersion != tls.VersionTLS13 || (info.CipherSuite != tls.TLS_AES_128_GCM_SHA256 && info.CipherSuite != tls.TLS_AES_256_GCM_SHA384) {
		t.Errorf("tls = %s %s, want TLS 1.3 with AES-GCM", info.TLSVersionName(), info.CipherSuiteName())
	}
	if info.Peer != serverID || info.Status != 200 || info.ALPN != "h2" || info.Reused {
		t.Errorf("info = %+v", info)
	}
	r := got.Load()
	if r == nil {
		t.Fatal("handler never ran")
	}
	if r.Peer != clientID {
		t.Errorf("server saw peer %v, want %v", r.Peer, clientID)
	}
	if r.Authority != echo {
		t.Errorf("server saw authority %v, want %v", r.Authority, echo)
	}
	if f, err := ForwardedFor(r.Header.Get("forwarded")); err != nil || f != netip.MustParseAddrPort("127.0.0.1:40000") {
		t.Errorf("forwarded = %q (%v, %v)", r.Header.Get("forwarded"), f, err)
	}
	if b, err := ParseBaggage(r.Header.Get("baggage")); err != nil || b.Get("k8s.namespace.name") != "default" {
		t.Errorf("baggage = %q (%v)", r.Header.Get("baggage"), err)
	}
	if _, err := ParseTraceparent(r.Header.Get("traceparent")); err != nil {
		t.Errorf("traceparent: %v", err)
	}
}

// transfer sends n random bytes through a stream to the echo server and
// checks they come back intact.
func transfer(t testing.TB, st *Stream, n int) error {
	src := make([]byte, n)
	rand.Read(src)
	want := sha256.Sum256(src)
	errc := make(chan error, 1)
	go func() {
		_, err := st.Write(src)
		if err == nil {
			err = st.CloseWrite()
		}
		errc <- err
	}()
	h := sha256.New()
	m, err := io.Copy(h, st)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", m, err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if m != int64(n) || !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("got %d bytes back (hash match %v), want %d", m, bytes.Equal(h.Sum(nil), want[:]), n)
	}
	return nil
}

func TestConcurrentStreamsShareConnections(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})

	const streams = 60
	var wg sync.WaitGroup
	errs := make(chan error, 2*streams)
	var open sync.WaitGroup
	open.Add(streams)
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := d.Dial(ctxT(t), request(srv.addr, echo))
			open.Done()
			if err != nil {
				errs <- err
				return
			}
			defer st.Close()
			open.Wait() // all streams live at once
			if c, _ := d.Stats(); c != spreadConns {
				errs <- fmt.Errorf("%d connections while %d streams open, want %d (spread, then shared)", c, streams, spreadConns)
			}
			errs <- transfer(t, st, 256<<10)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if n := srv.accepts.Load(); n != spreadConns {
		t.Errorf("server accepted %d TCP connections, want %d", n, spreadConns)
	}
}

func TestPoolReuseAndKeys(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})
	ctx := ctxT(t)

	dial := func(req Request) *Stream {
		t.Helper()
		st, err := d.Dial(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if err := transfer(t, st, 1000); err != nil {
			t.Fatal(err)
		}
		st.Close()
		return st
	}
	base := request(srv.addr, echo)
	if dial(base).Info().Reused {
		t.Error("first stream says reused")
	}
	if !dial(base).Info().Reused {
		t.Error("second stream with the same key did not reuse the connection")
	}
	other := base
	other.Source = identity.ID{TrustDomain: "cluster.local", Namespace: "other", ServiceAccount: "client"}
	if dial(other).Info().Reused {
		t.Error("another source identity reused a connection")
	}
	both := base
	both.Expected = []identity.ID{serverID, clientID}
	if dial(both).Info().Reused {
		t.Error("another set of expected identities reused a connection")
	}
	if c, _ := d.Stats(); c != 3 {
		t.Errorf("pool holds %d connections, want 3 (one per key)", c)
	}
	if n := srv.accepts.Load(); n != 3 {
		t.Errorf("server accepted %d connections, want 3", n)
	}
}

func TestPoolStreamLimitOpensNewConnection(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{MaxStreams: 2})
	var held []*Stream
	for i := 0; i < 5; i++ {
		st, err := d.Dial(ctxT(t), request(srv.addr, echo))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, st)
	}
	if c, s := d.Stats(); c != 3 || s != 5 {
		t.Errorf("stats = %d connections, %d streams; want 3 and 5 (2 streams each)", c, s)
	}
	for _, st := range held {
		if err := transfer(t, st, 10000); err != nil {
			t.Error(err)
		}
		st.Close()
	}
}

func TestPeerStreamLimitIsHonoured(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{MaxStreams: 3}) // server advertises 3
	echo := echoServer(t)
	d := newDialer(t, m, Config{})
	st, err := d.Dial(ctxT(t), request(srv.addr, echo)) // learns the limit
	if err != nil {
		t.Fatal(err)
	}
	held := []*Stream{st}
	for i := 0; i < 5; i++ {
		st, err := d.Dial(ctxT(t), request(srv.addr, echo))
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, st)
	}
	if c, _ := d.Stats(); c != 2 {
		t.Errorf("%d connections for 6 streams at the server's limit of 3, want 2", c)
	}
	for _, st := range held {
		st.Close()
	}
}

func TestOneDialPerKey(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})
	var wg sync.WaitGroup
	for i := 0; i < 30; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := d.Dial(ctxT(t), request(srv.addr, echo))
			if err != nil {
				t.Error(err)
				return
			}
			st.Close()
		}()
	}
	wg.Wait()
	// One dial at a time per key: at most the spread, not one per caller.
	if n := srv.accepts.Load(); n < 1 || n > spreadConns {
		t.Errorf("30 simultaneous dials made %d TCP connections, want 1 to %d", n, spreadConns)
	}
}

func TestHalfCloseBothDirections(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	d := newDialer(t, m, Config{})

	// The upstream speaks first, half-closes, then keeps reading: the
	// server-to-client direction ends while client-to-server goes on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	received := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("banner"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		received <- string(b)
	}()
	st, err := d.Dial(ctxT(t), request(srv.addr, netip.MustParseAddrPort(l.Addr().String())))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	b, err := io.ReadAll(st) // EOF arrives while our side is still open
	if err != nil || string(b) != "banner" {
		t.Fatalf("read %q, %v; want banner then EOF", b, err)
	}
	for i := 0; i < 3; i++ {
		if _, err := st.Write([]byte("after-eof ")); err != nil {
			t.Fatalf("write after the peer's half-close: %v", err)
		}
	}
	st.CloseWrite()
	select {
	case got := <-received:
		if got != strings.Repeat("after-eof ", 3) {
			t.Errorf("upstream got %q", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream never saw EOF")
	}
}

func TestLargeTransferBothDirections(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})
	st, err := d.Dial(ctxT(t), request(srv.addr, echo))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// 64 MiB out and back at once: far more than every window, so flow
	// control must keep both directions moving.
	if err := transfer(t, st, 64<<20); err != nil {
		t.Fatal(err)
	}
}

func TestSlowReaderIsFlowControlled(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	accepted := make(chan *Stream, 1)
	release := make(chan struct{})
	h := HandlerFunc(func(ctx context.Context, r *ServerRequest) {
		st, err := r.Accept(nil)
		if err != nil {
			return
		}
		accepted <- st
		<-release // never reads until told
	})
	srv := startServer(t, m, serverID, h, Config{})
	defer close(release)
	d := newDialer(t, m, Config{StreamWindow: 1 << 20})
	st, err := d.Dial(ctxT(t), request(srv.addr, netip.MustParseAddrPort("127.0.0.1:9")))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	<-accepted
	st.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
	n, err := st.Write(make([]byte, 32<<20))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write to a peer that never reads: %d bytes, err %v; want a deadline error", n, err)
	}
	// The server advertises a 4 MiB stream window: no more may be in flight.
	if n != DefaultStreamWindow {
		t.Errorf("wrote %d bytes before blocking, want exactly the peer's stream window %d", n, DefaultStreamWindow)
	}
}

func TestHandlerVerdicts(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	h := HandlerFunc(func(ctx context.Context, r *ServerRequest) {
		switch r.Authority.Port() {
		case 401:
			r.Reject(http.StatusUnauthorized, "denied by policy default/deny-all")
		case 7: // returns without an answer
		default:
			relayHandler().ServeHBONE(ctx, r)
		}
	})
	srv := startServer(t, m, serverID, h, Config{})
	d := newDialer(t, m, Config{})
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := netip.MustParseAddrPort(closed.Addr().String())
	closed.Close() // nothing listens there now

	cases := []struct {
		target netip.AddrPort
		status int
		reason string
	}{
		{netip.MustParseAddrPort("127.0.0.1:401"), 401, "deny-all"},
		{netip.MustParseAddrPort("127.0.0.1:7"), 503, "no answer"},
		{closedAddr, 503, "refused"},
	}
	for _, tc := range cases {
		_, err := d.Dial(ctxT(t), request(srv.addr, tc.target))
		var se *StatusError
		if !errors.As(err, &se) || se.Status != tc.status || !strings.Contains(se.Reason, tc.reason) {
			t.Errorf("dial %v: err = %v; want status %d with a reason containing %q", tc.target, err, tc.status, tc.reason)
		}
		if StatusCode(err) != tc.status {
			t.Errorf("StatusCode(%v) = %d", err, StatusCode(err))
		}
	}
	// The connection survives refusals: the next good stream reuses it.
	st, err := d.Dial(ctxT(t), request(srv.addr, echoServer(t)))
	if err != nil {
		t.Fatal(err)
	}
	if !st.Info().Reused {
		t.Error("refused streams broke the pooled connection")
	}
	st.Close()
}

func TestServerShutdownDrains(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})
	st, err := d.Dial(ctxT(t), request(srv.addr, echo))
	if err != nil {
		t.Fatal(err)
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- srv.Shutdown(ctx)
	}()
	time.Sleep(100 * time.Millisecond)
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v while a stream was open", err)
	default:
	}
	// The live stream keeps working through the drain.
	if err := transfer(t, st, 1<<20); err != nil {
		t.Fatal(err)
	}
	st.Close()
	select {
	case err := <-shut:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the last stream ended")
	}
	// GOAWAY took the connection out of the pool; the listener is gone.
	if _, err := d.Dial(ctxT(t), request(srv.addr, echo)); err == nil {
		t.Fatal("dial succeeded after shutdown")
	}
}

// frozenProxy forwards TCP both ways until freeze is called; then it stops
// forwarding without closing, like a peer that hangs.
type frozenProxy struct {
	addr   netip.AddrPort
	frozen atomic.Bool
}

func startFrozenProxy(t *testing.T, target netip.AddrPort) *frozenProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &frozenProxy{addr: netip.MustParseAddrPort(l.Addr().String())}
	var conns []net.Conn
	var mu sync.Mutex
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	go func() {
		for {
			a, err := l.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", target.String())
			if err != nil {
				a.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, a, b)
			mu.Unlock()
			cp := func(dst, src net.Conn) {
				buf := make([]byte, 32<<10)
				for {
					n, err := src.Read(buf)
					if err != nil {
						return
					}
					if p.frozen.Load() {
						continue // swallow
					}
					dst.Write(buf[:n])
				}
			}
			go cp(a, b)
			go cp(b, a)
		}
	}()
	return p
}

func TestKeepaliveClosesSilentConnection(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	proxy := startFrozenProxy(t, srv.addr)
	d := newDialer(t, m, Config{PingInterval: 50 * time.Millisecond, PingTimeout: 300 * time.Millisecond})
	st, err := d.Dial(ctxT(t), request(proxy.addr, echo))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// Healthy for a while: PINGs are answered, the connection stays.
	time.Sleep(500 * time.Millisecond)
	if c, _ := d.Stats(); c != 1 {
		t.Fatalf("connection dropped while the peer answered PINGs")
	}
	proxy.frozen.Store(true)
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = st.Read(make([]byte, 1))
	if !errors.Is(err, errKeepalive) {
		t.Fatalf("read on a silent connection: %v, want the keepalive error", err)
	}
	if c, _ := d.Stats(); c != 0 {
		t.Errorf("dead connection still pooled")
	}
}

func TestIdleConnectionIsClosed(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{IdleTimeout: 150 * time.Millisecond})
	st, err := d.Dial(ctxT(t), request(srv.addr, echo))
	if err != nil {
		t.Fatal(err)
	}
	if err := transfer(t, st, 100); err != nil {
		t.Fatal(err)
	}
	st.Close()
	deadline := time.Now().Add(3 * time.Second)
	for {
		if c, _ := d.Stats(); c == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("idle connection was never closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// A new dial makes a fresh connection.
	st, err = d.Dial(ctxT(t), request(srv.addr, echo))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if st.Info().Reused || srv.accepts.Load() != 2 {
		t.Errorf("after idle close: reused=%v accepts=%d, want a new connection", st.Info().Reused, srv.accepts.Load())
	}
}

func TestRenewalDuringLiveStreams(t *testing.T) {
	ca := newCA(t)
	var renewals atomic.Int32
	m := identity.NewManager(&identity.LocalIssuer{CA: ca, TTL: 2 * time.Second}, nil)
	m.OnRenew = func(*identity.Certificate) { renewals.Add(1) }
	t.Cleanup(m.Close)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})

	st, err := d.Dial(ctxT(t), request(srv.addr, echo))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	first := m.Current(clientID)
	// Keep the stream busy across several renewals (every ~1 s) and past
	// the first certificates' expiry.
	buf := make([]byte, 4096)
	end := time.Now().Add(3500 * time.Millisecond)
	for i := 0; time.Now().Before(end); i++ {
		rand.Read(buf)
		if _, err := st.Write(buf); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		back := make([]byte, len(buf))
		if _, err := io.ReadFull(st, back); err != nil {
			t.Fatalf("read %d: %v", i, err)
		}
		if !bytes.Equal(back, buf) {
			t.Fatalf("round %d: corrupted", i)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if renewals.Load() < 4 { // first issue of 2 identities + at least one renewal each
		t.Fatalf("only %d certificates issued in 3.5 s with a 2 s TTL", renewals.Load())
	}
	now := m.Current(clientID)
	if now == first || now.Leaf().SerialNumber.Cmp(first.Leaf().SerialNumber) == 0 {
		t.Fatal("client certificate was not renewed")
	}
	if time.Now().Before(first.NotAfter()) {
		t.Fatal("test did not outlive the first certificate")
	}
	// A new connection (another key) uses the renewed certificates.
	d2 := newDialer(t, m, Config{})
	st2, err := d2.Dial(ctxT(t), request(srv.addr, echo))
	if err != nil {
		t.Fatalf("dial after renewal: %v", err)
	}
	defer st2.Close()
	if err := transfer(t, st2, 1000); err != nil {
		t.Fatal(err)
	}
}

// A handler that answers, half-closes and returns while the client has not
// finished sending resets the stream; the client must still read every byte
// and a clean EOF, as with a TCP server that closes after replying.
func TestEndStreamThenResetReadsAsEOF(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	reply := bytes.Repeat([]byte("reply "), 100000)
	h := HandlerFunc(func(ctx context.Context, r *ServerRequest) {
		st, err := r.Accept(nil)
		if err != nil {
			return
		}
		st.Write(reply)
		st.CloseWrite()
	})
	srv := startServer(t, m, serverID, h, Config{})
	d := newDialer(t, m, Config{})
	st, err := d.Dial(ctxT(t), request(srv.addr, netip.MustParseAddrPort("127.0.0.1:9")))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	time.Sleep(100 * time.Millisecond) // let END_STREAM and the RST both arrive
	got, err := io.ReadAll(st)
	if err != nil || !bytes.Equal(got, reply) {
		t.Fatalf("read %d bytes, err %v; want %d bytes and EOF", len(got), err, len(reply))
	}
	var re *ResetError
	if _, err := st.Write([]byte("x")); !errors.As(err, &re) || re.Code != http2.ErrCodeCancel || !re.Remote {
		t.Fatalf("write after the server closed: %v, want a remote CANCEL reset", err)
	}
}

type failingWriter struct{ after int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.after <= 0 {
		return 0, errors.New("writer broke")
	}
	w.after--
	return len(p), nil
}

// WriteTo hands the received chunks to the writer until END_STREAM, with
// every byte in order, and stops at the writer's first error.
func TestStreamWriteTo(t *testing.T) {
	open := echoStreams(t)
	st := open()
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16+3) // ~1 MiB, not a chunk multiple
	go func() {
		st.Write(data)
		st.CloseWrite()
	}()
	var got bytes.Buffer
	n, err := st.WriteTo(&got)
	if err != nil || n != int64(len(data)) || !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("WriteTo: %d bytes, %v; content equal %v", n, err, bytes.Equal(got.Bytes(), data))
	}

	st2 := open()
	go st2.Write(data)
	if _, err := st2.WriteTo(&failingWriter{after: 1}); err == nil || err.Error() != "writer broke" {
		t.Fatalf("WriteTo to a failing writer: %v, want its error", err)
	}
}

// WriteTo a socket: the connection's reader writes straight to it while it
// keeps up, and queues for WriteTo when the socket is full (the peer below
// reads nothing until a chunk had to queue, then all); every byte arrives
// once, in order, and the count includes both ways.
func TestStreamWriteToSocket(t *testing.T) {
	st := echoStreams(t)()
	sink, far := testutil.TCPPair(t)
	// Small buffers, so the socket fills whatever the machine's TCP memory
	// limits (up to 32 MiB here: 8 MiB fitted without one queued chunk).
	if err := sink.SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	if err := far.SetReadBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 8<<20+321)
	for i := range data {
		data[i] = byte(i * 7 / 13)
	}
	go func() {
		st.Write(data)
		st.CloseWrite()
	}()
	done := make(chan int64, 1)
	go func() {
		n, err := st.WriteTo(sink)
		if err != nil {
			t.Error(err)
		}
		sink.CloseWrite()
		done <- n
	}()
	// Not a sleep: wait until the reader found the socket full and queued
	// (or WriteTo is writing what it queued), however slow the machine.
	testutil.WaitFor(t, "a chunk queued for a full socket", func() bool {
		st.c.mu.Lock()
		defer st.c.mu.Unlock()
		return st.rbuf.len() > 0 || st.wtBusy
	})
	far.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(far)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("socket got %d of %d bytes (%v); equal %v", len(got), len(data), err, bytes.Equal(got, data))
	}
	if n := <-done; n != int64(len(data)) {
		t.Fatalf("WriteTo counted %d bytes, want %d", n, len(data))
	}
	st.c.mu.Lock()
	sunk := st.sunk
	st.c.mu.Unlock()
	if sunk == 0 || sunk == int64(len(data)) {
		t.Fatalf("%d of %d bytes written by the reader directly: want some, not all (the socket was full a while)", sunk, len(data))
	}
}

// WriteToAsync: between bursts no goroutine runs for the stream (parked),
// every byte reaches the socket in order, and done comes once at the end
// with the count.
func TestStreamWriteToAsync(t *testing.T) {
	st := echoStreams(t)()
	sink, far := testutil.TCPPair(t)
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 2)
	if !st.WriteToAsync(sink, AsyncDoneFunc(func(n int64, err error) { done <- result{n, err} })) {
		t.Fatal("WriteToAsync refused a TCP socket")
	}
	if st.WriteToAsync(sink, AsyncDoneFunc(func(int64, error) {})) {
		t.Fatal("a second WriteToAsync on the same stream was taken")
	}
	parked := func() bool {
		st.c.mu.Lock()
		defer st.c.mu.Unlock()
		return st.park.w != nil && !st.park.running
	}
	var want []byte
	far.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := range 3 {
		burst := bytes.Repeat([]byte{byte('a' + i)}, 100000*(i+1))
		want = append(want, burst...)
		if _, err := st.Write(burst); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(burst))
		if _, err := io.ReadFull(far, got); err != nil || !bytes.Equal(got, burst) {
			t.Fatalf("burst %d: %v, equal %v", i, err, bytes.Equal(got, burst))
		}
		deadline := time.Now().Add(2 * time.Second)
		for !parked() && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if !parked() {
			t.Fatalf("after burst %d the stream's sink is not parked", i)
		}
	}
	st.CloseWrite()
	select {
	case r := <-done:
		if r.err != nil || r.n != int64(len(want)) {
			t.Fatalf("done(%d, %v), want (%d, nil)", r.n, r.err, len(want))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("done not called after END_STREAM")
	}
	select {
	case r := <-done:
		t.Fatalf("done called twice (%+v)", r)
	case <-time.After(100 * time.Millisecond):
	}
}

// An idle HBONE connection holds one goroutine on each side, its reader:
// frames out are written by whoever has them, or by a writer goroutine
// that ends with its queue (one stayed per connection, with the stack its
// TLS writes grew: ~1.6 MB at a node proxy's 100 connections).
func TestIdleConnectionHoldsOnlyItsReader(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{MaxStreams: 1})
	const conns = 10
	var held []*Stream
	for range conns {
		st, err := d.Dial(ctxT(t), request(srv.addr, echo))
		if err != nil {
			t.Fatal(err)
		}
		// A round trip, with the stream left open: the pool keeps its
		// connection, and both sides have written.
		msg := bytes.Repeat([]byte("x"), 100<<10)
		go st.Write(msg)
		if _, err := io.ReadFull(st, make([]byte, len(msg))); err != nil {
			t.Fatal(err)
		}
		held = append(held, st)
	}
	if c, _ := d.Stats(); c != conns {
		t.Fatalf("%d connections, want %d", c, conns)
	}
	// The connections' own goroutines: the handlers' (one per stream, in
	// relayHandler) are not theirs.
	count := func() (readers, others int, all string) {
		buf := make([]byte, 1<<20)
		all = string(buf[:runtime.Stack(buf, true)])
		for _, g := range strings.Split(all, "\n\n") {
			switch {
			case strings.Contains(g, "internal/hbone.(*conn).readLoop"):
				readers++
			case strings.Contains(g, "internal/hbone.(*conn).") && !strings.Contains(g, "internal/hbone.(*conn).onHeaders"):
				others++
			}
		}
		return readers, others, all
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		readers, others, all := count()
		if readers == 2*conns && others == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d idle connections run %d readers and %d other goroutines, want %d and 0:\n%s", conns, readers, others, 2*conns, all)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, st := range held {
		st.Close()
	}
}

// A read deadline fails a waiting Read, and clearing it lets the stream
// read again. The deadlines live apart from the stream (most streams never
// have one), which keeps the stream, WriteToAsync's state included, in the
// 320-byte size class.
func TestStreamReadDeadline(t *testing.T) {
	if n := unsafe.Sizeof(Stream{}); n > 320 {
		t.Errorf("Stream is %d bytes: above the 320-byte size class a node proxy holds 10,000 of", n)
	}
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	d := newDialer(t, m, Config{})
	st, err := d.Dial(ctxT(t), request(srv.addr, echoServer(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	buf := make([]byte, 4)
	if _, err := st.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past its deadline: %v", err)
	}
	st.SetReadDeadline(time.Time{})
	if _, err := st.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(st, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read after clearing the deadline: %q, %v", buf, err)
	}
}
