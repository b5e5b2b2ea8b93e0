package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/socks5"
	"github.com/ambitmesh/ambit/internal/testutil"
	istiohbone "istio.io/istio/pkg/hbone"
	istiolog "istio.io/istio/pkg/log"
)

// istioTLS is the TLS a mesh peer built on Istio's Go HBONE would use: its
// own SPIFFE certificate, and the peer's chain checked against the mesh's
// root (by SPIFFE ID, not host name). seen gets the peer's identity.
func istioTLS(own *identity.Certificate, server bool, seen func(identity.ID)) *tls.Config {
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*own.TLS()},
		NextProtos:   []string{"h2"},
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := identity.VerifyChain(cs.PeerCertificates, own.RootPool(), time.Now())
			if err == nil && seen != nil {
				seen(id)
			}
			return err
		},
	}
	if server {
		cfg.ClientAuth = tls.RequireAnyClientCert
	} else {
		cfg.InsecureSkipVerify = true // checked in VerifyConnection
	}
	return cfg
}

// Istio's own Go HBONE (istio.io/istio/pkg/hbone) against Ambit's proxies,
// both ways: its dialer through Ambit's 15008 to an app, and Ambit's
// outbound to its server, each with mutual TLS on the mesh's identities.
func TestIstioGoHBONEInterop(t *testing.T) {
	if s := istiolog.FindScope("hbone"); s != nil {
		s.SetOutputLevel(istiolog.ErrorLevel) // it logs every connection at info
	}
	m := newMesh(t, "", "")

	// Istio's dialer -> the server proxy's 15008 -> the server app.
	var mu sync.Mutex
	var sawServer identity.ID
	client := testutil.Issue(t, m.ca, identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "client"})
	d := istiohbone.NewDialer(istiohbone.Config{
		ProxyAddress: netip.AddrPortFrom(m.serverIP, ambient.ZtunnelInboundPort).String(),
		TLS:          istioTLS(client, false, func(id identity.ID) { mu.Lock(); sawServer = id; mu.Unlock() }),
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(m.serverIP, 8080).String())
	if err != nil {
		t.Fatalf("Istio's HBONE dialer to Ambit's 15008: %v", err)
	}
	msg := []byte("from Istio's Go HBONE")
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, len(msg))
	if _, err := io.ReadFull(c, back); err != nil || string(back) != string(msg) {
		t.Fatalf("through Ambit's 15008: %q, %v\nserver proxy:\n%s", back, err, m.server.log.String())
	}
	c.Close()
	mu.Lock()
	if sawServer.String() != "spiffe://cluster.local/ns/default/sa/server" {
		t.Errorf("Istio's dialer was served by %s, want the server's identity", sawServer)
	}
	mu.Unlock()
	testutil.WaitFor(t, "the server proxy's record", func() bool {
		return strings.Contains(m.server.log.String(), "src.identity=spiffe://cluster.local/ns/default/sa/client")
	})

	// Ambit's client proxy -> Istio's HBONE server, as the 15008 of a mesh
	// workload ("peer") -> its app.
	peerIP := m.ip(50)
	echoOn(t, netip.AddrPortFrom(peerIP, 8080))
	var sawClient identity.ID
	peer := testutil.Issue(t, m.ca, identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "peer"})
	srv := istiohbone.NewServer()
	srv.TLSConfig = istioTLS(peer, true, func(id identity.ID) { mu.Lock(); sawClient = id; mu.Unlock() })
	srv.Protocols.SetHTTP2(true) // h2c by default; HBONE is h2 over TLS
	l, err := net.Listen("tcp", netip.AddrPortFrom(peerIP, ambient.ZtunnelInboundPort).String())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(l, "", "") }()
	defer func() {
		srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Error(err)
		}
	}()
	peerWl := fmt.Sprintf("- uid: test//peer\n  name: peer\n  namespace: default\n  serviceAccount: peer\n  workloadIps: [\"%s\"]\n  protocol: HBONE\n  node: node-c\n", peerIP)
	m.write(m.config(peerWl, ""))
	testutil.WaitFor(t, "the peer in the client's view", func() bool { return m.client.p.Index().WorkloadByUID("test//peer") != nil })
	sc, code, err := m.socks(peerIP.String(), 8080)
	if err != nil || code != socks5.Succeeded {
		t.Fatalf("Ambit's outbound to Istio's HBONE server: code %d, %v\nclient proxy:\n%s", code, err, m.client.log.String())
	}
	defer sc.Close()
	sc.SetDeadline(time.Now().Add(20 * time.Second))
	out, err := roundTrip(sc, []byte("from Ambit's outbound"))
	if err != nil || string(out) != "from Ambit's outbound" {
		t.Fatalf("through Istio's HBONE server: %q, %v\nclient proxy:\n%s", out, err, m.client.log.String())
	}
	mu.Lock()
	if sawClient.String() != "spiffe://cluster.local/ns/default/sa/client" {
		t.Errorf("Istio's server saw %s, want the client's identity", sawClient)
	}
	mu.Unlock()
	testutil.WaitFor(t, "the client proxy's record of the HBONE hop to Istio's server", func() bool {
		return strings.Contains(m.client.log.String(), "dst.hbone_addr="+netip.AddrPortFrom(peerIP, ambient.ZtunnelInboundPort).String())
	})
}
