package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
)

// TLSRelay is the reference the mesh is measured against: the leanest
// encrypted tunnel there is. Its client side accepts plain TCP and opens one
// TLS 1.3 connection per TCP connection to the server side, which connects
// on to the target in plain TCP; both copy with io.Copy each way. No HTTP/2,
// no pooling, no policy, no metrics. The certificates and their check are
// the mesh's (SPIFFE workload certificates from one CA, chain verified), so
// the crypto work per byte is the same as the mesh's.
type TLSRelay struct {
	Listen  string // address to accept on
	Connect string // the server side's address (client mode) or the target's (server mode)
	Server  bool   // accept TLS and connect in plain TCP; otherwise the reverse
	CA      *identity.CA
	Log     *slog.Logger
}

var (
	relayClientID = identity.ID{TrustDomain: "cluster.local", Namespace: "bench", ServiceAccount: "relay-client"}
	relayServerID = identity.ID{TrustDomain: "cluster.local", Namespace: "bench", ServiceAccount: "relay-server"}
)

// Run serves until ctx ends.
func (r *TLSRelay) Run(ctx context.Context) error {
	id := relayClientID
	if r.Server {
		id = relayServerID
	}
	cert, err := (&identity.LocalIssuer{CA: r.CA}).Issue(ctx, id)
	if err != nil {
		return fmt.Errorf("tls relay: certificate: %w", err)
	}
	cfg := relayTLS(cert, r.Server)
	l, err := net.Listen("tcp", r.Listen)
	if err != nil {
		return fmt.Errorf("tls relay: %w", err)
	}
	r.Log.Info("tls relay listening", "addr", l.Addr().String(), "connect", r.Connect, "server", r.Server)
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("tls relay: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.serve(ctx, c.(*net.TCPConn), cfg); err != nil {
				r.Log.Warn("tls relay connection", "from", c.RemoteAddr().String(), "err", err)
			}
		}()
	}
}

func (r *TLSRelay) serve(ctx context.Context, down *net.TCPConn, cfg *tls.Config) error {
	defer down.Close()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(dctx, "tcp", r.Connect)
	if err != nil {
		return fmt.Errorf("dial %s: %w", r.Connect, err)
	}
	defer raw.Close()
	var a, b halfCloser
	if r.Server {
		t := tls.Server(down, cfg)
		if err := t.HandshakeContext(dctx); err != nil {
			return fmt.Errorf("handshake: %w", err)
		}
		a, b = t, raw.(*net.TCPConn)
	} else {
		t := tls.Client(raw, cfg)
		if err := t.HandshakeContext(dctx); err != nil {
			return fmt.Errorf("handshake with %s: %w", r.Connect, err)
		}
		a, b = down, t
	}
	// Plain io.Copy each way, passing the half-close on: the reference is
	// deliberately the simplest relay, not Ambit's relay package.
	errc := make(chan error, 1)
	go func() { errc <- copyClose(b, a) }()
	err1 := copyClose(a, b)
	err = errors.Join(err1, <-errc)
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}

type halfCloser interface {
	io.ReadWriter
	CloseWrite() error
}

func copyClose(dst, src halfCloser) error {
	_, err := io.Copy(dst, src)
	dst.CloseWrite()
	return err
}

// relayTLS is the mesh's TLS set-up without ALPN: TLS 1.3, a workload
// certificate on each side, the peer's chain verified against the roots.
func relayTLS(own *identity.Certificate, server bool) *tls.Config {
	verify := func(cs tls.ConnectionState) error {
		_, err := identity.VerifyChain(cs.PeerCertificates, own.RootPool(), time.Now())
		return err
	}
	cfg := &tls.Config{
		MinVersion:       tls.VersionTLS13,
		Certificates:     []tls.Certificate{*own.TLS()},
		VerifyConnection: verify,
	}
	if server {
		cfg.ClientAuth = tls.RequireAnyClientCert
	} else {
		cfg.InsecureSkipVerify = true // the chain is checked in VerifyConnection, by SPIFFE ID rather than host name
	}
	return cfg
}
