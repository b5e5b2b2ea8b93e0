// Package kubetest runs a real Kubernetes API server (etcd and
// kube-apiserver, built by `make k8s-bins`) for tests, and gives them
// client-go and Istio's client-go to write objects with: the reference
// clients, so that Ambit's own small API client is checked against what
// the field uses. No binary of Ambit links it.
package kubetest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// Version is the Kubernetes release the tests run (the Makefile's K8S_VERSION).
const Version = "v1.37.2"

// Audience is the one audience the API server's tokens default to, and the
// one Istio's CA asks for.
const Audience = "istio-ca"

// APIServer is a running etcd and kube-apiserver on loopback.
type APIServer struct {
	URL        string // https://127.0.0.1:PORT
	CA         []byte // PEM roots for the serving certificate
	AdminToken string // a system:masters bearer token
	Kubeconfig string // a kubeconfig file for the admin
	Issuer     string // the service-account token issuer
	// SigningKey signs service-account tokens; a test may sign one itself
	// (an expired token, say) and the API server will judge it as its own.
	SigningKey *rsa.PrivateKey

	Kube  *kubernetes.Clientset
	Istio *istioclient.Clientset
	Dyn   *dynamic.DynamicClient
}

// BinDir is where `make k8s-bins` puts the binaries.
func BinDir() string {
	if d := os.Getenv("K8S_BIN"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "ambit", "k8s-"+Version)
}

// Start runs an API server for the test and stops it (and removes its
// files) at the end. The binaries missing is a failure, not a skip: `make
// test` builds them first.
func Start(t testing.TB) *APIServer {
	t.Helper()
	dir := BinDir()
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Fatalf("kubetest: %s not in %s (run `make k8s-bins`, or set K8S_BIN): %v", b, dir, err)
		}
	}
	work := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	var procs sync.WaitGroup
	t.Cleanup(func() { cancel(); procs.Wait() })

	clientPort, peerPort, securePort := freePort(t), freePort(t), freePort(t)
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(clientPort)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peerPort)
	run(t, ctx, &procs, work, filepath.Join(dir, "etcd"),
		"--name=default", "--data-dir="+filepath.Join(work, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL, "--log-level=warn",
		"--quota-backend-bytes=1073741824")

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(work, "sa.key")
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	_, _ = rand.Read(buf)
	admin := hex.EncodeToString(buf)
	tokenFile := filepath.Join(work, "tokens.csv")
	if err := os.WriteFile(tokenFile, []byte(admin+`,admin,admin,"system:masters"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	certDir := filepath.Join(work, "certs")
	issuer := "https://kubernetes.default.svc.cluster.local"
	run(t, ctx, &procs, work, filepath.Join(dir, "kube-apiserver"),
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(securePort), "--cert-dir="+certDir,
		"--endpoint-reconciler-type=none",
		"--service-account-issuer="+issuer,
		"--service-account-key-file="+keyFile,
		"--service-account-signing-key-file="+keyFile,
		"--api-audiences="+Audience,
		"--token-auth-file="+tokenFile,
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/16",
		// Without the controller-manager nobody creates a namespace's
		// "default" account; the tests name the accounts their pods use.
		"--disable-admission-plugins=ServiceAccount",
		"--v=0")

	s := &APIServer{URL: "https://127.0.0.1:" + strconv.Itoa(securePort), AdminToken: admin, Issuer: issuer, SigningKey: key}
	s.waitReady(t, certDir)
	s.Kubeconfig = filepath.Join(work, "kubeconfig")
	if err := os.WriteFile(s.Kubeconfig, []byte(s.kubeconfig()), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := s.RestConfig()
	if s.Kube, err = kubernetes.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if s.Istio, err = istioclient.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if s.Dyn, err = dynamic.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	s.installCRDs(t)
	return s
}

// RestConfig is client-go's view of the admin.
func (s *APIServer) RestConfig() *rest.Config {
	return &rest.Config{Host: s.URL, BearerToken: s.AdminToken, TLSClientConfig: rest.TLSClientConfig{CAData: s.CA}, QPS: 1000, Burst: 2000}
}

func (s *APIServer) kubeconfig() string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user:
    token: %s
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
`, s.URL, base64.StdEncoding.EncodeToString(s.CA), s.AdminToken)
}

// waitReady waits for the serving certificate, then /readyz.
func (s *APIServer) waitReady(t testing.TB, certDir string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	var last error
	for time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
		ca, err := os.ReadFile(filepath.Join(certDir, "apiserver.crt"))
		if err != nil {
			last = err
			continue
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			last = fmt.Errorf("apiserver.crt holds no certificate")
			continue
		}
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
		req, _ := http.NewRequest("GET", s.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+s.AdminToken)
		resp, err := c.Do(req)
		if err != nil {
			last = err
			continue
		}
		resp.Body.Close()
		c.CloseIdleConnections()
		if resp.StatusCode == 200 {
			s.CA = ca
			return
		}
		last = fmt.Errorf("/readyz: %s", resp.Status)
	}
	t.Fatalf("kubetest: the API server is not ready after 2 minutes: %v", last)
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// AuthorizationPolicyCRD is Istio's AuthorizationPolicy CRD, from the
// Istio module this one builds against, as YAML.
func AuthorizationPolicyCRD() ([]byte, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		return nil, fmt.Errorf("kubetest: finding the istio.io/istio module: %w", err)
	}
	file := filepath.Join(strings.TrimSpace(string(out)), "manifests", "charts", "base", "files", "crd-all.gen.yaml")
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("kubetest: Istio's CRDs: %w", err)
	}
	for doc := range strings.SplitSeq(string(data), "\n---\n") {
		if strings.Contains(doc, "name: authorizationpolicies.security.istio.io") {
			return []byte(doc), nil
		}
	}
	return nil, fmt.Errorf("kubetest: %s has no AuthorizationPolicy CRD", file)
}

// installCRDs installs Istio's AuthorizationPolicy CRD and waits until it
// is served.
func (s *APIServer) installCRDs(t testing.TB) {
	t.Helper()
	doc, err := AuthorizationPolicyCRD()
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		t.Fatalf("kubetest: the AuthorizationPolicy CRD: %v", err)
	}
	crd := &unstructured.Unstructured{}
	if err := json.Unmarshal(js, &crd.Object); err != nil {
		t.Fatalf("kubetest: the AuthorizationPolicy CRD: %v", err)
	}
	ctx := context.Background()
	if _, err := s.Dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
		t.Fatalf("kubetest: creating the AuthorizationPolicy CRD: %v", err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := s.Istio.SecurityV1().AuthorizationPolicies("default").List(ctx, metav1.ListOptions{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubetest: the AuthorizationPolicy CRD is not served after a minute: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// run starts a process that lives until ctx ends; its output goes to a
// file in work, shown if the test fails.
func run(t testing.TB, ctx context.Context, wg *sync.WaitGroup, work, bin string, args ...string) {
	t.Helper()
	logFile := filepath.Join(work, filepath.Base(bin)+".log")
	f, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("kubetest: %s: %v", bin, err)
	}
	wg.Add(1)
	go func() { // owned by the test: ends when Cleanup cancels ctx
		defer wg.Done()
		_ = cmd.Wait()
		f.Close()
	}()
	t.Cleanup(func() {
		if t.Failed() {
			if b, err := os.ReadFile(logFile); err == nil {
				t.Logf("%s's log (last 4 KiB):\n%s", filepath.Base(bin), tail(b, 4096))
			}
		}
	})
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// freePort is a loopback port nobody listens on now.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// SignToken signs a service-account token with the API server's own key,
// for what TokenRequest will not issue (one already expired, say). claims
// are the private "kubernetes.io" claims.
func (s *APIServer) SignToken(t testing.TB, sub string, aud []string, notBefore, expiry time.Time, claims map[string]any) string {
	t.Helper()
	pub, err := x509.MarshalPKIXPublicKey(&s.SigningKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(pub)
	kid := base64.RawURLEncoding.EncodeToString(sum[:])
	header, _ := json.Marshal(map[string]string{"alg": "RS256", "kid": kid, "typ": "JWT"})
	body, _ := json.Marshal(map[string]any{
		"iss": s.Issuer, "sub": sub, "aud": aud,
		"iat": notBefore.Unix(), "nbf": notBefore.Unix(), "exp": expiry.Unix(),
		"kubernetes.io": claims,
	})
	signing := base64.RawURLEncoding.EncodeToString(header) + "." + base64.RawURLEncoding.EncodeToString(body)
	h := sha256.Sum256([]byte(signing))
	sig, err := rsa.SignPKCS1v15(rand.Reader, s.SigningKey, crypto.SHA256, h[:])
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}
