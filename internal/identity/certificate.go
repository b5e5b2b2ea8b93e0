package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"
)

// Certificate is one identity's credentials: its chain (leaf first), its
// private key and the trust bundle it was issued with. It is immutable; a
// renewal makes a new one.
type Certificate struct {
	ID    ID
	Chain []*x509.Certificate
	Key   crypto.Signer
	Roots []*x509.Certificate

	tls   tls.Certificate
	roots *x509.CertPool
}

// NewCertificate checks that chain, key and roots belong together and that
// the leaf carries id, and prepares the TLS form.
func NewCertificate(id ID, chain []*x509.Certificate, key crypto.Signer, roots []*x509.Certificate) (*Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("certificate: empty chain")
	}
	if len(roots) == 0 {
		return nil, errors.New("certificate: empty trust bundle")
	}
	leaf := chain[0]
	if !publicKeysEqual(key, leaf.PublicKey) {
		return nil, errors.New("certificate: private key does not match the leaf")
	}
	got, err := IDFromCertificate(leaf)
	if err != nil {
		return nil, fmt.Errorf("certificate: %w", err)
	}
	if got != id {
		return nil, fmt.Errorf("certificate: leaf is for %s, want %s", got, id)
	}
	c := &Certificate{ID: id, Chain: chain, Key: key, Roots: roots, roots: x509.NewCertPool()}
	for _, r := range roots {
		c.roots.AddCert(r)
	}
	c.tls.PrivateKey = key
	c.tls.Leaf = leaf
	for _, x := range chain {
		c.tls.Certificate = append(c.tls.Certificate, x.Raw)
	}
	return c, nil
}

// Leaf is the certificate itself, without its chain.
func (c *Certificate) Leaf() *x509.Certificate { return c.Chain[0] }

// NotAfter is when the certificate expires.
func (c *Certificate) NotAfter() time.Time { return c.Chain[0].NotAfter }

// TLS returns the certificate in the form crypto/tls presents.
func (c *Certificate) TLS() *tls.Certificate { return &c.tls }

// RootPool returns the trust bundle as a pool, to verify peers with.
func (c *Certificate) RootPool() *x509.CertPool { return c.roots }

// IDFromCertificate returns the single SPIFFE ID among a certificate's URI SANs.
func IDFromCertificate(cert *x509.Certificate) (ID, error) {
	var found []*url.URL
	for _, u := range cert.URIs {
		if u.Scheme == "spiffe" {
			found = append(found, u)
		}
	}
	switch len(found) {
	case 0:
		return ID{}, errors.New("no spiffe:// URI SAN")
	case 1:
		return Parse(found[0].String())
	default:
		return ID{}, fmt.Errorf("%d spiffe:// URI SANs, want exactly one", len(found))
	}
}

// VerifyChain checks a peer's chain against roots at time now and returns the
// leaf's SPIFFE ID. It accepts certificates for client or server use.
func VerifyChain(chain []*x509.Certificate, roots *x509.CertPool, now time.Time) (ID, error) {
	if len(chain) == 0 {
		return ID{}, errors.New("no certificate presented")
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return ID{}, err
	}
	return IDFromCertificate(chain[0])
}

// NewCSR makes a fresh ECDSA P-256 key and a CSR for id: empty subject, one URI SAN.
func NewCSR(id ID) (csrDER []byte, key *ecdsa.PrivateKey, err error) {
	key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create CSR for %s: %w", id, err)
	}
	return der, key, nil
}

// EncodeCSR writes a DER CSR as PEM, the form Istio's CA protocol carries.
func EncodeCSR(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// Issuer obtains a certificate for one identity: the in-process CA now, a
// remote CA later. Each call makes a new key.
type Issuer interface {
	Issue(ctx context.Context, id ID) (*Certificate, error)
}

// LocalIssuer issues certificates from an in-process CA.
type LocalIssuer struct {
	CA  *CA
	TTL time.Duration // zero: the CA's default
}

// Issue makes a key and CSR and has the CA sign it.
func (l *LocalIssuer) Issue(ctx context.Context, id ID) (*Certificate, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	der, key, err := NewCSR(id)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("parse CSR: %w", err)
	}
	chain, err := l.CA.Sign(csr, id, l.TTL)
	if err != nil {
		return nil, err
	}
	return NewCertificate(id, chain, key, l.CA.Roots())
}
