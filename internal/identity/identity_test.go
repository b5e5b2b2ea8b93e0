package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

func TestParseID(t *testing.T) {
	good := map[string]ID{
		"spiffe://cluster.local/ns/default/sa/default": {"cluster.local", "default", "default"},
		"spiffe://td-1_x.example/ns/a.b-c_d/sa/X9":     {"td-1_x.example", "a.b-c_d", "X9"},
	}
	for s, want := range good {
		got, err := Parse(s)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %v, %v; want %v", s, got, err, want)
		}
		if got.String() != s {
			t.Errorf("String() = %q, want %q", got.String(), s)
		}
		if p, err := ParsePrincipal(strings.TrimPrefix(s, "spiffe://")); err != nil || p != want {
			t.Errorf("ParsePrincipal: %v, %v", p, err)
		}
	}
	bad := []string{
		"", "spiffe://", "spiffe://cluster.local", "spiffe://cluster.local/",
		"SPIFFE://cluster.local/ns/a/sa/b", "spiffe://Cluster.local/ns/a/sa/b",
		"spiffe://cluster.local:8080/ns/a/sa/b", "spiffe://user@cluster.local/ns/a/sa/b",
		"spiffe://cluster.local/ns/a/sa/b?x=1", "spiffe://cluster.local/ns/a/sa/b#f",
		"spiffe://cluster.local/ns/a/sa/b/", "spiffe://cluster.local/ns//sa/b",
		"spiffe://cluster.local/ns/a/sa/", "spiffe://cluster.local/sa/b/ns/a",
		"spiffe://cluster.local/ns/../sa/b", "spiffe://cluster.local/ns/a%20b/sa/b",
		"spiffe://cluster.local/ns/a/sa/b/extra", "https://cluster.local/ns/a/sa/b",
		"spiffe:///ns/a/sa/b", "spiffe://cluster.local/NS/a/sa/b",
		"spiffe://" + strings.Repeat("a", 3000) + "/ns/a/sa/b",
	}
	for _, s := range bad {
		if id, err := Parse(s); err == nil {
			t.Errorf("Parse(%q) = %v, want an error", s, id)
		}
	}
	if _, err := ParsePrincipal("spiffe://cluster.local/ns/a/sa/b"); err == nil {
		t.Error("ParsePrincipal accepted a scheme")
	}
}

func TestIDCompareAndText(t *testing.T) {
	a := ID{"cluster.local", "a", "x"}
	b := ID{"cluster.local", "b", "x"}
	if a.Compare(b) != -1 || b.Compare(a) != 1 || a.Compare(a) != 0 {
		t.Error("Compare is not an order")
	}
	txt, _ := a.MarshalText()
	var back ID
	if err := back.UnmarshalText(txt); err != nil || back != a {
		t.Errorf("text round trip: %v %v", back, err)
	}
	if a.URL().String() != a.String() {
		t.Errorf("URL %q != String %q", a.URL(), a)
	}
	if (ID{}).String() != "" || !(ID{}).IsZero() {
		t.Error("zero ID")
	}
}

func FuzzParseID(f *testing.F) {
	f.Add("spiffe://cluster.local/ns/default/sa/default")
	f.Add("spiffe://a/ns/b/sa/c")
	f.Add("spiffe://a.b/ns/%2e/sa/c")
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			return
		}
		// Whatever parses is canonical: it prints back as itself and
		// survives the URL form a certificate carries.
		if id.String() != s {
			t.Fatalf("Parse(%q).String() = %q", s, id.String())
		}
		u, err := url.Parse(id.URL().String())
		if err != nil || u.String() != s {
			t.Fatalf("URL form of %q: %v %v", s, u, err)
		}
	})
}

func newTestCA(t *testing.T) (*CA, string) {
	t.Helper()
	dir := t.TempDir()
	ca, err := InitCA(dir, "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return ca, dir
}

func TestInitLoadAndSign(t *testing.T) {
	_, dir := newTestCA(t)
	for _, f := range []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("init did not write %s: %v", f, err)
		}
	}
	if st, _ := os.Stat(filepath.Join(dir, CAKeyFile)); st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v, want 0600", st.Mode().Perm())
	}
	if _, err := InitCA(dir, "test", time.Hour); err == nil {
		t.Fatal("InitCA overwrote an existing CA")
	}
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	id := ID{"cluster.local", "default", "client"}
	cert, err := (&LocalIssuer{CA: ca, TTL: 2 * time.Hour}).Issue(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	leaf := cert.Leaf()
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() || len(leaf.DNSNames) != 0 || len(leaf.Subject.String()) != 0 {
		t.Errorf("leaf SANs/subject: uris=%v dns=%v subject=%q", leaf.URIs, leaf.DNSNames, leaf.Subject)
	}
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("leaf key %T, want ECDSA P-256", leaf.PublicKey)
	}
	// The TTL is clamped to the CA's own validity (1 h here).
	if leaf.NotAfter.After(ca.Certificate().NotAfter) {
		t.Errorf("leaf outlives its CA: %v > %v", leaf.NotAfter, ca.Certificate().NotAfter)
	}
	if got, err := VerifyChain(cert.Chain, ca.RootPool(), time.Now()); err != nil || got != id {
		t.Errorf("VerifyChain = %v, %v", got, err)
	}
	def, _ := (&LocalIssuer{CA: ca}).Issue(context.Background(), id)
	if d := def.NotAfter().Sub(def.Leaf().NotBefore); d > time.Hour+2*time.Minute {
		t.Errorf("default TTL not clamped: %v", d)
	}
}

func TestDefaultTTLIs24h(t *testing.T) {
	ca, _ := newTestCA(t)
	ca.cert.NotAfter = time.Now().Add(100 * 24 * time.Hour) // pretend a long-lived CA, for the clamp
	id := ID{"cluster.local", "default", "client"}
	der, _, _ := NewCSR(id)
	csr, _ := x509.ParseCertificateRequest(der)
	chain, err := ca.Sign(csr, id, 0)
	if err != nil {
		t.Fatal(err)
	}
	life := time.Until(chain[0].NotAfter)
	if life < 24*time.Hour-time.Minute || life > 24*time.Hour+time.Minute {
		t.Errorf("default lifetime %v, want 24h", life)
	}
}

func TestSignRefusals(t *testing.T) {
	ca, _ := newTestCA(t)
	id := ID{"cluster.local", "default", "client"}
	other := ID{"cluster.local", "default", "admin"}
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	mk := func(tmpl *x509.CertificateRequest, key any) *x509.CertificateRequest {
		der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			t.Fatal(err)
		}
		csr, _ := x509.ParseCertificateRequest(der)
		return csr
	}
	cases := map[string]*x509.CertificateRequest{
		"another identity's SAN": mk(&x509.CertificateRequest{URIs: []*url.URL{other.URL()}}, ecKey),
		"DNS SAN":                mk(&x509.CertificateRequest{URIs: []*url.URL{id.URL()}, DNSNames: []string{"evil"}}, ecKey),
		"P-384 key":              mk(&x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, p384),
		"RSA key":                mk(&x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, rsaKey),
	}
	for name, csr := range cases {
		if _, err := ca.Sign(csr, id, 0); err == nil {
			t.Errorf("%s: signed", name)
		}
	}
	tampered := mk(&x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, ecKey)
	tampered.Signature[len(tampered.Signature)-1] ^= 0xff
	if _, err := ca.Sign(tampered, id, 0); err == nil {
		t.Error("tampered CSR signed")
	}
	if _, err := ca.Sign(mk(&x509.CertificateRequest{}, ecKey), id, 0); err != nil {
		t.Errorf("CSR with no SAN: %v", err)
	}
}

// writePEM writes blocks to dir/name.
func writePEM(t *testing.T, dir, name string, blocks ...*pem.Block) {
	t.Helper()
	var out []byte
	for _, b := range blocks {
		out = append(out, pem.EncodeToMemory(b)...)
	}
	if err := os.WriteFile(filepath.Join(dir, name), out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// An intermediate CA with an RSA root and a SEC1 or PKCS#1 key, as other
// tools write them: Sign chains through the intermediate.
func TestLoadIntermediateLayouts(t *testing.T) {
	rootKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	rootDER, _ := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	root, _ := x509.ParseCertificate(rootDER)

	for _, keyKind := range []string{"sec1", "pkcs1", "pkcs8"} {
		t.Run(keyKind, func(t *testing.T) {
			var key interface {
				Public() any
			}
			var keyBlock *pem.Block
			switch keyKind {
			case "sec1":
				k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				der, _ := x509.MarshalECPrivateKey(k)
				key, keyBlock = publicOnly{k.Public()}, &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
			case "pkcs1":
				k, _ := rsa.GenerateKey(rand.Reader, 2048)
				key, keyBlock = publicOnly{k.Public()}, &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}
			case "pkcs8":
				k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				der, _ := x509.MarshalPKCS8PrivateKey(k)
				key, keyBlock = publicOnly{k.Public()}, &pem.Block{Type: "PRIVATE KEY", Bytes: der}
			}
			interTmpl := &x509.Certificate{
				SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "intermediate"},
				NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
				IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
			}
			interDER, err := x509.CreateCertificate(rand.Reader, interTmpl, root, key.Public(), rootKey)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			interBlock := &pem.Block{Type: "CERTIFICATE", Bytes: interDER}
			rootBlock := &pem.Block{Type: "CERTIFICATE", Bytes: rootDER}
			writePEM(t, dir, CACertFile, interBlock)
			writePEM(t, dir, CAKeyFile, keyBlock)
			writePEM(t, dir, RootCertFile, rootBlock)
			writePEM(t, dir, CertChainFile, interBlock, rootBlock)
			ca, err := LoadCA(dir)
			if err != nil {
				t.Fatal(err)
			}
			id := ID{"cluster.local", "ns1", "sa1"}
			cert, err := (&LocalIssuer{CA: ca}).Issue(context.Background(), id)
			if err != nil {
				t.Fatal(err)
			}
			// leaf + intermediate; the root travels in the bundle only.
			if len(cert.Chain) != 2 || !cert.Chain[1].Equal(ca.Certificate()) {
				t.Fatalf("chain has %d certificates", len(cert.Chain))
			}
			if _, err := VerifyChain(cert.Chain, ca.RootPool(), time.Now()); err != nil {
				t.Fatal(err)
			}
		})
	}
}

type publicOnly struct{ pub any }

func (p publicOnly) Public() any { return p.pub }

func TestLoadCAErrors(t *testing.T) {
	_, dir := newTestCA(t)
	_, otherDir := newTestCA(t)
	copyFile := func(from, to string) {
		b, _ := os.ReadFile(from)
		os.WriteFile(to, b, 0o600)
	}
	// The key of another CA.
	copyFile(filepath.Join(otherDir, CAKeyFile), filepath.Join(dir, CAKeyFile))
	if _, err := LoadCA(dir); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("mismatched key: %v", err)
	}
	// A missing file is named.
	os.Remove(filepath.Join(otherDir, RootCertFile))
	if _, err := LoadCA(otherDir); err == nil || !strings.Contains(err.Error(), RootCertFile) {
		t.Errorf("missing root: %v", err)
	}
	// Garbage is named with its file.
	_, third := newTestCA(t)
	os.WriteFile(filepath.Join(third, CACertFile), []byte("not pem"), 0o600)
	if _, err := LoadCA(third); err == nil || !strings.Contains(err.Error(), CACertFile) {
		t.Errorf("garbage cert: %v", err)
	}
}

// A CA made by the openssl command-line tool loads unchanged.
func TestLoadOpenSSLCA(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Skip("SKIP: openssl not installed (make test installs it)")
	}
	dir := t.TempDir()
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command(openssl, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("openssl %v: %v\n%s", args, err, out)
		}
	}
	os.WriteFile(filepath.Join(dir, "ext.cnf"), []byte("[v3_ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"), 0o600)
	run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root-key.pem", "-out", RootCertFile, "-days", "2", "-subj", "/O=openssl/CN=root")
	run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", CAKeyFile) // SEC1 "EC PRIVATE KEY"
	run("req", "-new", "-key", CAKeyFile, "-out", "ca.csr", "-subj", "/O=openssl/CN=intermediate")
	run("x509", "-req", "-in", "ca.csr", "-CA", RootCertFile, "-CAkey", "root-key.pem", "-CAcreateserial", "-out", CACertFile, "-days", "1", "-extfile", "ext.cnf", "-extensions", "v3_ca")
	a, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	b, _ := os.ReadFile(filepath.Join(dir, RootCertFile))
	os.WriteFile(filepath.Join(dir, CertChainFile), append(a, b...), 0o644)

	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	id := ID{"cluster.local", "default", "default"}
	cert, err := (&LocalIssuer{CA: ca}).Issue(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	// openssl itself accepts what we issued under its root.
	os.WriteFile(filepath.Join(dir, "leaf.pem"), EncodeCertificates(cert.Chain[:1]), 0o644)
	os.WriteFile(filepath.Join(dir, "untrusted.pem"), EncodeCertificates(cert.Chain[1:]), 0o644)
	run("verify", "-CAfile", RootCertFile, "-untrusted", "untrusted.pem", "leaf.pem")
}

// flakyIssuer fails while fail is set; it counts calls and records their times.
type flakyIssuer struct {
	inner *LocalIssuer
	fail  atomic.Bool
	mu    sync.Mutex
	calls []time.Time
}

func (f *flakyIssuer) Issue(ctx context.Context, id ID) (*Certificate, error) {
	f.mu.Lock()
	f.calls = append(f.calls, time.Now())
	f.mu.Unlock()
	if f.fail.Load() {
		return nil, errors.New("CA unavailable")
	}
	return f.inner.Issue(ctx, id)
}

func (f *flakyIssuer) times() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.calls...)
}

func TestManagerRenewsAtHalfLife(t *testing.T) {
	// In a synctest bubble: the clock is fake and timers fire exactly when due, so the gaps checked below do not depend on how busy the machine is.
	synctest.Test(t, func(t *testing.T) {
		ca, _ := newTestCA(t)
		// X.509 times have one-second resolution: a 3 s TTL leaves 2-3 s.
		iss := &flakyIssuer{inner: &LocalIssuer{CA: ca, TTL: 3 * time.Second}}
		m := NewManager(iss, nil)
		type receipt struct {
			at   time.Time
			cert *Certificate
		}
		got := make(chan receipt, 16)
		m.OnRenew = func(c *Certificate) { got <- receipt{time.Now(), c} }
		defer m.Close()
		id := ID{"cluster.local", "default", "client"}
		if _, err := m.Get(context.Background(), id); err != nil {
			t.Fatal(err)
		}
		first := <-got
		var second receipt
		select {
		case second = <-got:
		case <-time.After(5 * time.Second):
			t.Fatal("no renewal within 5 s of a 3 s certificate")
		}
		// The renewal request went out at half the life left at receipt.
		calls := iss.times()
		want := first.at.Add(first.cert.NotAfter().Sub(first.at) / 2)
		if d := calls[1].Sub(want); d < -5*time.Millisecond || d > 150*time.Millisecond {
			t.Errorf("renewal requested %v after the half-life point", d)
		}
		if second.cert.Leaf().SerialNumber.Cmp(first.cert.Leaf().SerialNumber) == 0 || m.Current(id) != second.cert {
			t.Error("current certificate is not the renewed one")
		}
		if !second.at.Before(first.cert.NotAfter()) {
			t.Error("renewed only after the old certificate expired")
		}
	})
}

func TestManagerBackoffKeepsValidCertificate(t *testing.T) {
	// In a synctest bubble: the clock is fake and timers fire exactly when due, so the gaps checked below do not depend on how busy the machine is.
	synctest.Test(t, func(t *testing.T) {
		ca, _ := newTestCA(t)
		iss := &flakyIssuer{inner: &LocalIssuer{CA: ca, TTL: 2 * time.Second}}
		m := NewManager(iss, nil)
		const initial, maxB = 50 * time.Millisecond, 200 * time.Millisecond
		m.InitialBackoff, m.MaxBackoff = initial, maxB
		defer m.Close()
		id := ID{"cluster.local", "default", "client"}
		good, err := m.Get(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		iss.fail.Store(true)
		start := len(iss.times())
		time.Sleep(2200 * time.Millisecond) // renewal at ~1 s fails; retries back off past expiry
		if m.Current(id) != good {
			t.Fatal("a failed renewal dropped the held certificate")
		}
		calls := iss.times()[start:]
		var gaps []time.Duration
		for i := 1; i < len(calls); i++ {
			gaps = append(gaps, calls[i].Sub(calls[i-1]))
		}
		if len(gaps) < 4 {
			t.Fatalf("only %d retries in 1.2 s of failure", len(gaps))
		}
		// 50, 100, 200, 200, ...: timers never fire early; allow lateness for a loaded machine.
		want := initial
		for i, g := range gaps {
			if g < want || g > want+150*time.Millisecond {
				t.Errorf("retry gap %d = %v, want %v (all gaps %v)", i, g, want, gaps)
			}
			want = min(want*2, maxB)
		}
		iss.fail.Store(false)
		deadline := time.Now().Add(2 * time.Second)
		for m.Current(id) == good && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if m.Current(id) == good {
			t.Fatal("no new certificate after the issuer recovered")
		}
	})
}

func TestManagerGetWaitsAndReportsFailure(t *testing.T) {
	ca, _ := newTestCA(t)
	iss := &flakyIssuer{inner: &LocalIssuer{CA: ca}}
	iss.fail.Store(true)
	m := NewManager(iss, nil)
	m.InitialBackoff = 10 * time.Millisecond
	defer m.Close()
	id := ID{"cluster.local", "default", "client"}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := m.Get(ctx, id)
	if err == nil || !strings.Contains(err.Error(), "CA unavailable") {
		t.Fatalf("Get while the issuer fails: %v, want the issuer's error", err)
	}
	iss.fail.Store(false)
	if _, err := m.Get(context.Background(), id); err != nil {
		t.Fatalf("Get after recovery: %v", err)
	}
	if _, err := m.Get(context.Background(), ID{}); err == nil {
		t.Error("Get of the zero ID succeeded")
	}
	m.Forget(id)
	if m.Current(id) != nil {
		t.Error("Forget kept the certificate")
	}
	m.Close()
	if _, err := m.Get(context.Background(), ID{"cluster.local", "x", "y"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Get after Close: %v", err)
	}
}

func TestManagerRejectsWrongOrExpiredCertificate(t *testing.T) {
	ca, _ := newTestCA(t)
	ca.Now = func() time.Time { return time.Now().Add(-30 * time.Hour) }
	m := NewManager(&LocalIssuer{CA: ca}, nil)
	m.InitialBackoff = 10 * time.Millisecond
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := m.Get(ctx, ID{"cluster.local", "default", "client"}); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Get with an issuer of expired certificates: %v", err)
	}
}

// root-cert.pem may hold several roots (a rotation in progress): all load.
func TestLoadBundleWithSeveralRoots(t *testing.T) {
	_, dir := newTestCA(t)
	_, other := newTestCA(t)
	a, _ := os.ReadFile(filepath.Join(dir, RootCertFile))
	b, _ := os.ReadFile(filepath.Join(other, RootCertFile))
	os.WriteFile(filepath.Join(dir, RootCertFile), append(a, b...), 0o644)
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ca.Roots()) != 2 {
		t.Fatalf("%d roots loaded, want 2", len(ca.Roots()))
	}
	cert, err := (&LocalIssuer{CA: ca}).Issue(context.Background(), ID{"cluster.local", "a", "b"})
	if err != nil || len(cert.Roots) != 2 {
		t.Fatalf("issued with %d roots, %v", len(cert.Roots), err)
	}
}
