package hbone

import (
	"crypto/tls"
	"fmt"
	"slices"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
)

// alpnH2 is the only application protocol HBONE speaks.
const alpnH2 = "h2"

// checkSuite enforces TLS 1.3 with an AES-GCM suite. Go does not let TLS 1.3
// suites be configured, so the negotiated one is checked after the
// handshake (Go prefers AES-GCM wherever the CPU has AES instructions).
func checkSuite(cs tls.ConnectionState) error {
	if cs.Version != tls.VersionTLS13 {
		return fmt.Errorf("TLS version %s, want TLS 1.3", tls.VersionName(cs.Version))
	}
	switch cs.CipherSuite {
	case tls.TLS_AES_128_GCM_SHA256, tls.TLS_AES_256_GCM_SHA384:
		return nil
	}
	return fmt.Errorf("cipher suite %s is not allowed (want an AES-GCM suite)", tls.CipherSuiteName(cs.CipherSuite))
}

// clientTLS presents src's certificate and accepts a server whose chain
// verifies against src's trust bundle and whose SPIFFE ID is one of expected.
func clientTLS(src *identity.Certificate, expected []identity.ID) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*src.TLS()},
		NextProtos:   []string{alpnH2},
		// Mesh peers are named by SPIFFE IDs, not host names: the standard
		// host-name check is replaced by VerifyConnection below, which
		// verifies the chain against the mesh roots and the expected IDs.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := checkSuite(cs); err != nil {
				return err
			}
			id, err := identity.VerifyChain(cs.PeerCertificates, src.RootPool(), time.Now())
			if err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			if !slices.Contains(expected, id) {
				return fmt.Errorf("server identity %s is not the expected %v", id, expected)
			}
			return nil
		},
	}
}

// serverTLS presents own's certificate and requires a client certificate
// from the same trust bundle and trust domain.
func serverTLS(own *identity.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*own.TLS()},
		NextProtos:   []string{alpnH2},
		ClientAuth:   tls.RequireAnyClientCert, // verified below against the mesh roots
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := checkSuite(cs); err != nil {
				return err
			}
			id, err := identity.VerifyChain(cs.PeerCertificates, own.RootPool(), time.Now())
			if err != nil {
				return fmt.Errorf("client certificate: %w", err)
			}
			if id.TrustDomain != own.ID.TrustDomain {
				return fmt.Errorf("client identity %s is from trust domain %q, want %q", id, id.TrustDomain, own.ID.TrustDomain)
			}
			return nil
		},
	}
}

// peerID returns the verified peer identity of a finished handshake.
func peerID(cs tls.ConnectionState) identity.ID {
	if len(cs.PeerCertificates) == 0 {
		return identity.ID{}
	}
	id, _ := identity.IDFromCertificate(cs.PeerCertificates[0])
	return id
}
