package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// The file names of Istio's plug-in CA layout (the "cacerts" secret).
const (
	CACertFile    = "ca-cert.pem"    // the signing certificate
	CAKeyFile     = "ca-key.pem"     // its private key (PKCS#8, SEC1 or PKCS#1)
	RootCertFile  = "root-cert.pem"  // the trust bundle: one or more roots
	CertChainFile = "cert-chain.pem" // ca-cert and its intermediates up to the root
)

// DefaultCertTTL is the lifetime of a workload certificate unless configured.
const DefaultCertTTL = 24 * time.Hour

// CA signs workload certificates. Its signing material comes from a directory
// in Istio's plug-in CA layout, so a CA made by openssl, cert-manager or an
// existing Istio install works unchanged.
type CA struct {
	cert  *x509.Certificate
	key   crypto.Signer
	chain []*x509.Certificate // from the signing certificate up, as in cert-chain.pem
	roots []*x509.Certificate

	// TTL is the lifetime of issued certificates; zero means DefaultCertTTL.
	TTL time.Duration
	// Now returns the current time; nil means time.Now. Tests set it to
	// issue certificates that are already expired or not yet valid.
	Now func() time.Time
}

// LoadCA reads a plug-in CA directory and checks that its parts fit together:
// the key matches ca-cert.pem, ca-cert.pem can sign, and the chain leads to
// one of the roots.
func LoadCA(dir string) (*CA, error) {
	read := func(name string) ([]byte, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("load CA: %w", err)
		}
		return b, nil
	}
	certPEM, err := read(CACertFile)
	if err != nil {
		return nil, err
	}
	keyPEM, err := read(CAKeyFile)
	if err != nil {
		return nil, err
	}
	rootPEM, err := read(RootCertFile)
	if err != nil {
		return nil, err
	}
	certs, err := ParseCertificates(certPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", filepath.Join(dir, CACertFile), err)
	}
	key, err := ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", filepath.Join(dir, CAKeyFile), err)
	}
	roots, err := ParseCertificates(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA: %s: %w", filepath.Join(dir, RootCertFile), err)
	}
	// cert-chain.pem is optional when ca-cert.pem is itself a root.
	var chain []*x509.Certificate
	if chainPEM, err := os.ReadFile(filepath.Join(dir, CertChainFile)); err == nil {
		chain, err = ParseCertificates(chainPEM)
		if err != nil {
			return nil, fmt.Errorf("load CA: %s: %w", filepath.Join(dir, CertChainFile), err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	ca, err := NewCA(certs[0], key, chain, roots)
	if err != nil {
		return nil, fmt.Errorf("load CA from %s: %w", dir, err)
	}
	return ca, nil
}

// NewCA builds a CA from parsed material. chain may be empty when cert is a
// root; otherwise it is cert followed by its intermediates (cert-chain.pem).
func NewCA(cert *x509.Certificate, key crypto.Signer, chain, roots []*x509.Certificate) (*CA, error) {
	if !publicKeysEqual(key, cert.PublicKey) {
		return nil, fmt.Errorf("%s does not match the public key of %s", CAKeyFile, CACertFile)
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s (%s) is not a CA certificate with the certSign key usage", CACertFile, cert.Subject)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("%s holds no root", RootCertFile)
	}
	if len(chain) > 0 && !chain[0].Equal(cert) {
		return nil, fmt.Errorf("%s must start with %s", CertChainFile, CACertFile)
	}
	if len(chain) == 0 {
		chain = []*x509.Certificate{cert}
	}
	ca := &CA{cert: cert, key: key, chain: chain, roots: roots}
	// The chain must verify to one of the roots, or nothing it signs would.
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := cert.Verify(x509.VerifyOptions{
		Roots: ca.RootPool(), Intermediates: inter, CurrentTime: cert.NotBefore.Add(time.Second),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, fmt.Errorf("%s does not chain to %s: %w", CACertFile, RootCertFile, err)
	}
	return ca, nil
}

// Roots returns the trust bundle.
func (ca *CA) Roots() []*x509.Certificate { return ca.roots }

// Certificate returns the signing certificate.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// RootPool returns the trust bundle as a pool.
func (ca *CA) RootPool() *x509.CertPool {
	p := x509.NewCertPool()
	for _, r := range ca.roots {
		p.AddCert(r)
	}
	return p
}

func (ca *CA) now() time.Time {
	if ca.Now != nil {
		return ca.Now()
	}
	return time.Now()
}

// Sign issues a certificate for id from a DER or parsed CSR. The CSR must be
// signed by an ECDSA P-256 key and carry no SAN but id's URI (an empty set of
// SANs is accepted too). The caller decides whether the requester may hold id.
// ttl of zero means the CA's TTL. The result is the chain, leaf first, ending
// with the signing certificate's chain (roots are in Roots).
func (ca *CA) Sign(csr *x509.CertificateRequest, id ID, ttl time.Duration) ([]*x509.Certificate, error) {
	if err := id.Validate(); err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("sign %s: CSR signature: %w", id, err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("sign %s: CSR key must be ECDSA P-256, got %T", id, csr.PublicKey)
	}
	if len(csr.DNSNames)+len(csr.EmailAddresses)+len(csr.IPAddresses) > 0 || len(csr.URIs) > 1 {
		return nil, fmt.Errorf("sign %s: CSR may carry only the identity's URI SAN", id)
	}
	if len(csr.URIs) == 1 && csr.URIs[0].String() != id.String() {
		return nil, fmt.Errorf("sign %s: CSR asks for %s", id, csr.URIs[0])
	}
	if ttl <= 0 {
		ttl = ca.TTL
	}
	if ttl <= 0 {
		ttl = DefaultCertTTL
	}
	now := ca.now()
	notBefore := now.Add(-time.Minute) // tolerate small clock skew between nodes
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("sign %s: serial: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	out := make([]*x509.Certificate, 0, 1+len(ca.chain))
	out = append(out, leaf)
	for _, c := range ca.chain {
		if !isSelfSigned(c) { // roots travel in the bundle, not the chain
			out = append(out, c)
		}
	}
	return out, nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil && string(c.RawIssuer) == string(c.RawSubject)
}

// InitCA creates a self-signed root in dir (which must not already hold one)
// in the plug-in layout, valid for validity, and returns it loaded.
func InitCA(dir, org string, validity time.Duration) (*CA, error) {
	if _, err := os.Stat(filepath.Join(dir, CAKeyFile)); err == nil {
		return nil, fmt.Errorf("init CA: %s already exists; refusing to overwrite a CA key", filepath.Join(dir, CAKeyFile))
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("init CA: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("init CA: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{org}, CommonName: "Ambit root CA"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("init CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("init CA: %w", err)
	}
	keyPEM, err := EncodePrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("init CA: %w", err)
	}
	certPEM := EncodeCertificates([]*x509.Certificate{cert})
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("init CA: %w", err)
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{CAKeyFile, keyPEM, 0o600},
		{CACertFile, certPEM, 0o644},
		{RootCertFile, certPEM, 0o644},
		{CertChainFile, certPEM, 0o644},
	}
	for _, f := range files {
		if err := writeFileAtomic(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return nil, fmt.Errorf("init CA: %w", err)
		}
	}
	return NewCA(cert, key, nil, []*x509.Certificate{cert})
}

// writeFileAtomic writes through a temporary file so a reader never sees half a file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// IssueServing makes a TLS server certificate (a fresh ECDSA P-256 key) for
// the control plane: DNS names and IPs, no SPIFFE ID. Its chain ends below
// the roots, like workload certificates.
func (ca *CA) IssueServing(dnsNames []string, ips []net.IP, ttl time.Duration) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := ca.now()
	notAfter := now.Add(ttl)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, NotBefore: now.Add(-time.Minute), NotAfter: notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    dnsNames, IPAddresses: ips, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("issue serving certificate: %w", err)
	}
	out := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	for _, c := range ca.chain {
		if !isSelfSigned(c) {
			out.Certificate = append(out.Certificate, c.Raw)
		}
	}
	return out, nil
}
