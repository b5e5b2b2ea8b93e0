package hbone

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/relay"
	"github.com/ambitmesh/ambit/internal/testutil"
)

var (
	clientID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	serverID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "server"}
)

// newCA and issue are testutil's CA and Issue under the names this
// package's tests call.
func newCA(t testing.TB) *identity.CA { t.Helper(); return testutil.CA(t) }

func issue(t testing.TB, ca *identity.CA, id identity.ID) *identity.Certificate {
	t.Helper()
	return testutil.Issue(t, ca, id)
}

// newManager returns a certificate manager over ca, closed with the test.
func newManager(t testing.TB, ca *identity.CA, ttl time.Duration) *identity.Manager {
	t.Helper()
	m := identity.NewManager(&identity.LocalIssuer{CA: ca, TTL: ttl}, nil)
	t.Cleanup(m.Close)
	return m
}

// logBuffer collects a component's log lines so a test can assert on them.
type logBuffer struct{ testutil.Buffer }

func (l *logBuffer) logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

// waitLog waits until the log holds substr.
func (l *logBuffer) waitLog(t testing.TB, substr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if bytes.Contains([]byte(l.String()), []byte(substr)) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("log never said %q; log:\n%s", substr, l.String())
}

// testServer is an HBONE server on a loopback port.
type testServer struct {
	*Server
	addr    netip.AddrPort
	log     logBuffer
	accepts atomic.Int32 // TCP connections accepted
}

type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startServer serves HBONE as id, with certificates from m, on 127.0.0.1.
func startServer(t testing.TB, m *identity.Manager, id identity.ID, h Handler, cfg Config) *testServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{}
	ts.Server = &Server{
		GetCertificate: func(ctx context.Context, _ netip.Addr) (*identity.Certificate, error) { return m.Get(ctx, id) },
		Handler:        h,
		Config:         cfg,
		Log:            ts.log.logger(),
	}
	ts.addr = netip.MustParseAddrPort(l.Addr().String())
	done := make(chan error, 1)
	go func() { done <- ts.Serve(countingListener{l, &ts.accepts}) }()
	t.Cleanup(func() {
		ts.Close()
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return ts
}

// relayHandler is what a node proxy does with an accepted tunnel: connect to the
// authority over real TCP and copy both ways, passing half-closes on.
func relayHandler() Handler {
	return HandlerFunc(func(ctx context.Context, r *ServerRequest) {
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
		relay.Bidirectional(st, up.(*net.TCPConn))
	})
}

// echoStreams returns a function that opens streams through a real HBONE
// server relaying to a TCP echo server, each closed with the test.
func echoStreams(t testing.TB) func() *Stream {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	d := newDialer(t, m, Config{})
	return func() *Stream {
		t.Helper()
		st, err := d.Dial(ctxT(t), request(srv.addr, echo))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
}

// serveTCP serves each loopback connection with serve until the test ends.
func serveTCP(t testing.TB, serve func(net.Conn)) netip.AddrPort {
	return testutil.ServeTCP(t, "127.0.0.1:0", serve)
}

// echoServer is a TCP echo server that passes half-closes on.
func echoServer(t testing.TB) netip.AddrPort { return testutil.Echo(t, "127.0.0.1:0", nil) }

// newDialer returns a dialer over m, closed with the test.
func newDialer(t testing.TB, m CertSource, cfg Config) *Dialer {
	t.Helper()
	d := &Dialer{Certs: m, Config: cfg}
	t.Cleanup(func() { d.Close() })
	return d
}

func request(srv, target netip.AddrPort) Request {
	return Request{Source: clientID, Expected: []identity.ID{serverID}, Address: srv, Authority: target}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}
