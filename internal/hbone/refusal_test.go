package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2"
)

// staticCerts is a CertSource that serves fixed certificates, for tests that
// need a certificate the manager would never hold (expired, foreign).
type staticCerts map[identity.ID]*identity.Certificate

func (s staticCerts) Get(_ context.Context, id identity.ID) (*identity.Certificate, error) {
	if c, ok := s[id]; ok {
		return c, nil
	}
	return nil, errors.New("no certificate")
}

func TestRefusals(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)

	otherCA := newCA(t)
	foreignTD := identity.ID{TrustDomain: "evil.example", Namespace: "default", ServiceAccount: "client"}
	pastCA := newCA(t)
	pastCA.Now = func() time.Time { return time.Now().Add(-48 * time.Hour) } // issues certs that expired a day ago

	cases := []struct {
		name      string
		certs     CertSource
		source    identity.ID
		expected  []identity.ID
		clientErr string // in the dial error
		serverLog string // in the server's log ("" when the client refuses first)
	}{
		{
			name:  "server identity not the expected one",
			certs: m, source: clientID, expected: []identity.ID{clientID},
			clientErr: "server identity spiffe://cluster.local/ns/default/sa/server is not the expected",
		},
		{
			name:  "client certificate from another CA",
			certs: staticCerts{clientID: withRoots(t, issue(t, otherCA, clientID), ca)}, source: clientID, expected: []identity.ID{serverID},
			clientErr: "remote error: tls: bad certificate", serverLog: "client certificate: x509: certificate signed by unknown authority",
		},
		{
			name:  "server certificate from another CA",
			certs: staticCerts{clientID: issue(t, otherCA, clientID)}, source: clientID, expected: []identity.ID{serverID},
			clientErr: "server certificate: x509: certificate signed by unknown authority",
		},
		{
			name:  "another trust domain",
			certs: m, source: foreignTD, expected: []identity.ID{serverID},
			clientErr: "remote error: tls: bad certificate", serverLog: `trust domain \"evil.example\", want \"cluster.local\"`,
		},
		{
			name:  "expired client certificate",
			certs: staticCerts{clientID: withRoots(t, issue(t, pastCA, clientID), ca)}, source: clientID, expected: []identity.ID{serverID},
			clientErr: "remote error: tls: bad certificate", serverLog: "client certificate: x509: certificate has expired",
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := newDialer(t, tc.certs, Config{})
			req := request(srv.addr, echo)
			req.Source, req.Expected = tc.source, tc.expected
			_, err := d.Dial(ctxT(t), req)
			if err == nil || !strings.Contains(err.Error(), tc.clientErr) {
				t.Fatalf("dial error = %v, want it to contain %q", err, tc.clientErr)
			}
			if tc.serverLog != "" {
				srv.log.waitLog(t, tc.serverLog)
			}
		})
	}
}

// withRoots re-bundles a certificate with another CA's roots, so a client
// holding a foreign or expired certificate still verifies the server.
func withRoots(t *testing.T, c *identity.Certificate, ca *identity.CA) *identity.Certificate {
	t.Helper()
	out, err := identity.NewCertificate(c.ID, c.Chain, c.Key, append(append([]*x509.Certificate{}, c.Roots...), ca.Roots()...))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestClientRefusesExpiredServer(t *testing.T) {
	ca := newCA(t)
	ca.Now = func() time.Time { return time.Now().Add(-48 * time.Hour) }
	expired := issue(t, ca, serverID)
	ca.Now = nil
	m := newManager(t, ca, 0)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{
		GetCertificate: func(context.Context, netip.Addr) (*identity.Certificate, error) { return expired, nil },
		Handler:        relayHandler(),
	}
	go s.Serve(l)
	defer s.Close()
	d := newDialer(t, m, Config{})
	_, err = d.Dial(ctxT(t), request(netip.MustParseAddrPort(l.Addr().String()), echoServer(t)))
	if err == nil || !strings.Contains(err.Error(), "server certificate: x509: certificate has expired") {
		t.Fatalf("dial to a server with an expired certificate: %v", err)
	}
}

func TestRefusesTLS12Client(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	cert := issue(t, ca, clientID)
	cfg := clientTLS(cert, []identity.ID{serverID})
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	_, err := tls.Dial("tcp", srv.addr.String(), cfg)
	if err == nil || !strings.Contains(err.Error(), "protocol version") {
		t.Fatalf("TLS 1.2 handshake: %v, want a protocol version alert", err)
	}
	srv.log.waitLog(t, "TLS handshake failed")
}

func TestRefusesPlaintextHTTP2(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	c, err := net.Dial("tcp", srv.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := http2.NewFramer(c, c)
	io.WriteString(c, http2.ClientPreface)
	fr.WriteSettings()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err != nil && !isReset(err) {
		t.Fatalf("read: %v", err)
	}
	srv.log.waitLog(t, "does not look like a TLS handshake")
}

func isReset(err error) bool { return strings.Contains(err.Error(), "connection reset") }

// h2Client is net/http's HTTP/2 client (x/net's, bundled) with a mesh certificate: a foreign
// peer that can send requests our Dialer never would.
// Every request goes to srv, whatever its URL or authority says.
func h2Client(t *testing.T, ca *identity.CA, srv netip.AddrPort) *http.Client {
	cert := issue(t, ca, clientID)
	cfg := clientTLS(cert, []identity.ID{serverID})
	var h2only http.Protocols
	h2only.SetHTTP2(true)
	tr := &http.Transport{
		TLSClientConfig: cfg,
		DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", srv.String())
		},
		ForceAttemptHTTP2: true,
		Protocols:         &h2only,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func TestRefusesNonConnectAndBadAuthority(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	client := h2Client(t, ca, srv.addr)

	resp, err := client.Get("https://" + srv.addr.String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(resp.Header.Get(reasonHeader), "plain CONNECT") {
		t.Errorf("GET: %d %q, want 400 naming CONNECT", resp.StatusCode, resp.Header.Get(reasonHeader))
	}
	for _, auth := range []string{"echo.default.svc:80", "127.0.0.1:0", "127.0.0.1:99999", "[::1%eth0]:80", "127.0.0.1"} {
		pr, pw := io.Pipe()
		req := &http.Request{Method: "CONNECT", URL: &url.URL{Scheme: "https", Host: auth}, Host: auth, Body: pr, Header: http.Header{}}
		resp, err := client.Do(req)
		pw.Close()
		if err != nil {
			t.Errorf("CONNECT %s: %v", auth, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(resp.Header.Get(reasonHeader), "authority") {
			t.Errorf("CONNECT %s: %d %q, want 400 naming the authority", auth, resp.StatusCode, resp.Header.Get(reasonHeader))
		}
	}
}

// A CONNECT from x/net's client is served like one from our own Dialer:
// the server speaks standard HTTP/2.
func TestForeignClientConnect(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	client := h2Client(t, ca, srv.addr)
	pr, pw := io.Pipe()
	req := &http.Request{Method: "CONNECT", URL: &url.URL{Scheme: "https", Host: echo.String()}, Host: echo.String(), Body: pr, Header: http.Header{}}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	go func() {
		pw.Write([]byte("through x/net"))
		pw.Close()
	}()
	b, err := io.ReadAll(resp.Body)
	if err != nil || string(b) != "through x/net" {
		t.Fatalf("echo %q, %v", b, err)
	}
}

func TestMisconfiguredIsAnErrorNotAPanic(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := (&Server{}).Serve(l); err == nil || !strings.Contains(err.Error(), "GetCertificate") {
		t.Errorf("Serve without certificates: %v", err)
	}
	if _, err := (&Dialer{}).Dial(context.Background(), Request{}); err == nil || !strings.Contains(err.Error(), "Certs") {
		t.Errorf("Dial without certificates: %v", err)
	}
	d := &Dialer{Certs: staticCerts{}}
	for name, req := range map[string]Request{
		"no source":    {Expected: []identity.ID{serverID}},
		"no expected":  {Source: clientID},
		"no address":   {Source: clientID, Expected: []identity.ID{serverID}},
		"no authority": {Source: clientID, Expected: []identity.ID{serverID}, Address: netip.MustParseAddrPort("127.0.0.1:15008")},
	} {
		if _, err := d.Dial(context.Background(), req); err == nil {
			t.Errorf("%s: dial succeeded", name)
		}
	}
	d.Close()
}

// Root rotation: while the mesh moves from one root to another, each side's
// trust bundle holds both; a workload on the old root and one on the new
// talk, and a client whose bundle lacks the new root refuses the server.
func TestTrustBundleWithTwoRoots(t *testing.T) {
	oldCA, newCA := newCA(t), newCA(t)
	both := append(append([]*x509.Certificate{}, oldCA.Roots()...), newCA.Roots()...)
	rebundle := func(c *identity.Certificate, roots []*x509.Certificate) *identity.Certificate {
		out, err := identity.NewCertificate(c.ID, c.Chain, c.Key, roots)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	srvCert := rebundle(issue(t, newCA, serverID), both)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{
		GetCertificate: func(context.Context, netip.Addr) (*identity.Certificate, error) { return srvCert, nil },
		Handler:        relayHandler(),
	}
	go s.Serve(l)
	defer s.Close()
	addr := netip.MustParseAddrPort(l.Addr().String())
	echo := echoServer(t)

	d := newDialer(t, staticCerts{clientID: rebundle(issue(t, oldCA, clientID), both)}, Config{})
	st, err := d.Dial(ctxT(t), request(addr, echo))
	if err != nil {
		t.Fatalf("old-root client to new-root server with both roots trusted: %v", err)
	}
	if err := transfer(t, st, 1000); err != nil {
		t.Fatal(err)
	}
	st.Close()

	stale := newDialer(t, staticCerts{clientID: issue(t, oldCA, clientID)}, Config{})
	if _, err := stale.Dial(ctxT(t), request(addr, echo)); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Fatalf("client without the new root: %v, want unknown authority", err)
	}
}
