// Package demo runs the loopback demonstration of Ambit's foundation: a CA,
// two workload identities, an HBONE tunnel between them on 127.0.0.x, bytes
// echoed through it, and each step printed for a person to read.
//
// It will give way to the lab's seed request once network namespaces exist.
package demo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/relay"
)

// Options tune the demo; the zero value is the default run.
type Options struct {
	CADir    string // where the CA lives; empty: a temporary directory, removed after
	ClientIP netip.Addr
	ServerIP netip.Addr
}

var (
	clientID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"}
	serverID = identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "server"}
)

// Run performs the demo, writing its account to w. It returns an error if
// any step does not behave as it should.
func Run(ctx context.Context, w io.Writer, opt Options) error {
	if !opt.ClientIP.IsValid() {
		opt.ClientIP = netip.MustParseAddr("127.0.0.10")
	}
	if !opt.ServerIP.IsValid() {
		opt.ServerIP = netip.MustParseAddr("127.0.0.20")
	}
	p := func(step, format string, args ...any) {
		fmt.Fprintf(w, "%-9s %s\n", step, fmt.Sprintf(format, args...))
	}
	fmt.Fprintln(w, "Ambit loopback demo: one workload talks to another through an HBONE tunnel.")
	fmt.Fprintln(w)

	// 1. The CA.
	dir := opt.CADir
	if dir == "" {
		tmp, err := os.MkdirTemp("", "ambit-demo-ca-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	ca, err := identity.LoadCA(dir)
	if err != nil {
		ca, err = identity.InitCA(dir, "ambit-demo", 24*time.Hour)
		if err != nil {
			return err
		}
		p("ca", "created a self-signed root in %s (Istio plug-in layout)", dir)
	} else {
		p("ca", "loaded the CA in %s", dir)
	}

	// 2. Identities.
	certs := identity.NewManager(&identity.LocalIssuer{CA: ca}, nil)
	defer certs.Close()
	for _, id := range []identity.ID{clientID, serverID} {
		c, err := certs.Get(ctx, id)
		if err != nil {
			return err
		}
		p("identity", "%s: ECDSA P-256 certificate, serial %x..., expires %s",
			id, c.Leaf().SerialNumber.Bytes()[:4], c.NotAfter().Format(time.RFC3339))
	}

	// 3. The server workload: a TCP echo app and the HBONE server in front of it.
	app, err := listen(opt.ServerIP, 8080)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait() // runs last: after the closes below end the goroutines
	defer app.Close()
	wg.Add(1)
	go func() { defer wg.Done(); serveEcho(app) }()
	appAddr := netip.MustParseAddrPort(app.Addr().String())
	p("app", "echo server listening on %s", appAddr)

	hl, err := listen(opt.ServerIP, ambient.ZtunnelInboundPort)
	if err != nil {
		return err
	}
	events := make(chan string, 8)
	srv := &hbone.Server{
		GetCertificate: func(ctx context.Context, local netip.Addr) (*identity.Certificate, error) {
			return certs.Get(ctx, serverID)
		},
		Handler: hbone.HandlerFunc(func(ctx context.Context, r *hbone.ServerRequest) {
			fwd, _ := hbone.ForwardedFor(r.Header.Get("forwarded"))
			events <- fmt.Sprintf("CONNECT %s from %s (forwarded for %s); dialing the app", r.Authority, r.Peer, fwd)
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
			events <- fmt.Sprintf("upstream %s connected; answered 200", r.Authority)
			relay.Bidirectional(st, up.(*net.TCPConn))
		}),
	}
	wg.Add(1)
	go func() { defer wg.Done(); _ = srv.Serve(hl) }()
	defer srv.Close()
	hboneAddr := netip.MustParseAddrPort(hl.Addr().String())
	p("hbone", "server listening on %s as %s", hboneAddr, serverID)

	// 4. The client side: an app connects to the client's proxy listener
	// (standing in for capture, which comes with the lab), and the proxy
	// carries the connection through the tunnel.
	pl, err := listen(opt.ClientIP, ambient.ZtunnelOutboundPort)
	if err != nil {
		return err
	}
	defer pl.Close()
	msg := []byte("GET / HTTP/1.1\r\nHost: 10.244.1.3\r\nUser-Agent: curl/7.85.0\r\nAccept: */*\r\n\r\n")
	appDone := make(chan appResult, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		appDone <- runClientApp(ctx, opt.ClientIP, pl.Addr().String(), msg)
	}()
	down, err := pl.Accept()
	if err != nil {
		return err
	}
	defer down.Close()
	clientAddr := netip.MustParseAddrPort(down.RemoteAddr().String())
	d := &hbone.Dialer{Certs: certs}
	defer d.Close()
	req := hbone.Request{
		Source:     clientID,
		Expected:   []identity.ID{serverID},
		Address:    hboneAddr,
		SourceAddr: opt.ClientIP,
		Authority:  appAddr,
		Header: http.Header{
			"Forwarded": {hbone.Forwarded{For: clientAddr.String()}.String()},
			"Baggage":   {hbone.Baggage{{Key: "k8s.namespace.name", Value: "default"}, {Key: "service.name", Value: "client"}}.String()},
		},
	}
	fmt.Fprintln(w)
	p("app", "client app %s connected to the client-side proxy at %s (capture stands in)", clientAddr, pl.Addr())
	p("dial", "%s -> %s, CONNECT %s", opt.ClientIP, hboneAddr, appAddr)
	st, err := d.Dial(ctx, req)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	info := st.Info()
	p("tcp", "new connection %s -> %s", info.LocalAddr, info.RemoteAddr)
	p("tls", "%s, %s, ALPN %s; the server proved %s", info.TLSVersionName(), info.CipherSuiteName(), info.ALPN, info.Peer)
	drain := func() {
		for {
			select {
			case e := <-events:
				p("server", "%s", e)
			default:
				return
			}
		}
	}
	drain()
	p("stream", "CONNECT answered %d on stream %d", info.Status, info.StreamID)
	relay.Bidirectional(down.(*net.TCPConn), st)
	st.Close()
	res := <-appDone
	if res.err != nil {
		return fmt.Errorf("client app: %w", res.err)
	}
	if !bytes.Equal(res.back, msg) {
		return fmt.Errorf("echo mismatch: sent %d bytes, got %d", len(msg), len(res.back))
	}
	p("bytes", "the app sent %d, received %d back, byte-exact; each side half-closed (END_STREAM)", len(msg), len(res.back))

	// 5. A second stream rides the pooled connection.
	st2, err := d.Dial(ctx, req)
	if err != nil {
		return fmt.Errorf("second dial: %w", err)
	}
	st2.Close()
	drain()
	if !st2.Info().Reused {
		return errors.New("second stream did not reuse the pooled connection")
	}
	p("pool", "a second CONNECT rode the same connection (stream %d)", st2.Info().StreamID)

	// 6. Refusal: a client that expects another identity will not talk.
	wrong := req
	wrong.Expected = []identity.ID{{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "db"}}
	_, err = d.Dial(ctx, wrong)
	if err == nil {
		return errors.New("a dial expecting another identity succeeded")
	}
	p("refused", "%v", err)
	drain()
	fmt.Fprintln(w)
	fmt.Fprintln(w, "ok: identities issued, tunnel verified both ways, bytes echoed.")
	return nil
}

type appResult struct {
	back []byte
	err  error
}

// runClientApp is the client workload: it connects from ip, sends msg,
// half-closes and reads the answer to the end.
func runClientApp(ctx context.Context, ip netip.Addr, to string, msg []byte) (r appResult) {
	d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, 0))}
	c, err := d.DialContext(ctx, "tcp", to)
	if err != nil {
		r.err = err
		return r
	}
	defer c.Close()
	if _, r.err = c.Write(msg); r.err != nil {
		return r
	}
	_ = c.(*net.TCPConn).CloseWrite()
	r.back, r.err = io.ReadAll(c)
	return r
}

// listen binds ip:port, or ip:0 if that port is taken.
func listen(ip netip.Addr, port uint16) (net.Listener, error) {
	l, err := net.Listen("tcp", netip.AddrPortFrom(ip, port).String())
	if err == nil {
		return l, nil
	}
	return net.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
}

func serveEcho(l net.Listener) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			_, _ = io.Copy(c, c)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
	}
}
