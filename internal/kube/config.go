package kube

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Config is how to reach one API server and who to be there.
type Config struct {
	// Server is the API server's URL: https://host:port.
	Server string
	// Roots verifies the server's certificate (nil: the system's).
	Roots *x509.CertPool
	// ServerName overrides the name checked in the server's certificate.
	ServerName string
	// Token is a static bearer token; TokenFile one re-read as it rotates
	// (a pod's projected service-account token). At most one is set.
	Token     string
	TokenFile string
	// Cert is a client certificate, for kubeconfigs that use one.
	Cert *tls.Certificate
	// Source names where this came from, for errors: a kubeconfig's path
	// and context, or "in-cluster".
	Source string
}

// The paths and variables a pod's service account is mounted at.
const (
	serviceAccountDir  = "/var/run/secrets/kubernetes.io/serviceaccount"
	InClusterTokenFile = serviceAccountDir + "/token"
	InClusterCAFile    = serviceAccountDir + "/ca.crt"
	envServiceHost     = "KUBERNETES_SERVICE_HOST"
	envServicePort     = "KUBERNETES_SERVICE_PORT"
)

// InCluster is the pod's own API access: the API server's Service from the
// environment, the service-account token and CA the kubelet mounts.
func InCluster() (*Config, error) {
	host, port := os.Getenv(envServiceHost), os.Getenv(envServicePort)
	if host == "" || port == "" {
		return nil, fmt.Errorf("in-cluster config: %s and %s are not set (not running in a pod? give --kubeconfig)", envServiceHost, envServicePort)
	}
	roots, err := LoadRoots(InClusterCAFile)
	if err != nil {
		return nil, fmt.Errorf("in-cluster config: %w", err)
	}
	return &Config{
		Server:    "https://" + net.JoinHostPort(host, port),
		Roots:     roots,
		TokenFile: InClusterTokenFile,
		Source:    "in-cluster",
	}, nil
}

// LoadRoots reads a PEM file of CA certificates.
func LoadRoots(file string) (*x509.CertPool, error) {
	pemData, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	return roots, nil
}

// kubeconfig is the part of kubectl's file format that names a server, its
// CA and a token or client certificate.
type kubeconfig struct {
	CurrentContext string `yaml:"current-context"`
	Clusters       []struct {
		Name    string `yaml:"name"`
		Cluster struct {
			Server                   string `yaml:"server"`
			CertificateAuthority     string `yaml:"certificate-authority"`
			CertificateAuthorityData string `yaml:"certificate-authority-data"`
			TLSServerName            string `yaml:"tls-server-name"`
			InsecureSkipTLSVerify    bool   `yaml:"insecure-skip-tls-verify"`
		} `yaml:"cluster"`
	} `yaml:"clusters"`
	Contexts []struct {
		Name    string `yaml:"name"`
		Context struct {
			Cluster string `yaml:"cluster"`
			User    string `yaml:"user"`
		} `yaml:"context"`
	} `yaml:"contexts"`
	Users []struct {
		Name string `yaml:"name"`
		User struct {
			Token                 string    `yaml:"token"`
			TokenFile             string    `yaml:"tokenFile"`
			ClientCertificate     string    `yaml:"client-certificate"`
			ClientCertificateData string    `yaml:"client-certificate-data"`
			ClientKey             string    `yaml:"client-key"`
			ClientKeyData         string    `yaml:"client-key-data"`
			Exec                  yaml.Node `yaml:"exec"`
			AuthProvider          yaml.Node `yaml:"auth-provider"`
			Username              string    `yaml:"username"`
		} `yaml:"user"`
	} `yaml:"users"`
}

// LoadKubeconfig reads kubectl's config file and takes its current
// context. Relative paths in it are relative to the file. Exec plugins and
// auth providers are not supported: the error says so.
func LoadKubeconfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	var kc kubeconfig
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("kubeconfig %s: context %q: %s", path, kc.CurrentContext, fmt.Sprintf(format, args...))
	}
	if kc.CurrentContext == "" {
		if len(kc.Contexts) != 1 {
			return nil, fmt.Errorf("kubeconfig %s: no current-context (and %d contexts)", path, len(kc.Contexts))
		}
		kc.CurrentContext = kc.Contexts[0].Name
	}
	ci := -1
	for i := range kc.Contexts {
		if kc.Contexts[i].Name == kc.CurrentContext {
			ci = i
		}
	}
	if ci < 0 {
		return nil, bad("no such context")
	}
	ctx := kc.Contexts[ci].Context
	rel := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(filepath.Dir(path), p)
	}
	cfg := &Config{Source: fmt.Sprintf("kubeconfig %s (context %s)", path, kc.CurrentContext)}
	found := false
	for _, c := range kc.Clusters {
		if c.Name != ctx.Cluster {
			continue
		}
		found = true
		u, err := url.Parse(c.Cluster.Server)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			return nil, bad("cluster %q: server %q is not an https:// URL", c.Name, c.Cluster.Server)
		}
		if c.Cluster.InsecureSkipTLSVerify {
			return nil, bad("cluster %q: insecure-skip-tls-verify is refused: the mesh's identities come through this connection", c.Name)
		}
		cfg.Server = strings.TrimSuffix(c.Cluster.Server, "/")
		cfg.ServerName = c.Cluster.TLSServerName
		pemData, err := dataOrFile(c.Cluster.CertificateAuthorityData, rel(c.Cluster.CertificateAuthority))
		if err != nil {
			return nil, bad("cluster %q: certificate-authority: %v", c.Name, err)
		}
		if pemData != nil {
			cfg.Roots = x509.NewCertPool()
			if !cfg.Roots.AppendCertsFromPEM(pemData) {
				return nil, bad("cluster %q: certificate-authority holds no PEM certificate", c.Name)
			}
		}
	}
	if !found {
		return nil, bad("no cluster %q", ctx.Cluster)
	}
	for _, u := range kc.Users {
		if u.Name != ctx.User {
			continue
		}
		if !u.User.Exec.IsZero() || !u.User.AuthProvider.IsZero() || u.User.Username != "" {
			return nil, bad("user %q: only token, tokenFile and client certificates are supported (not exec plugins, auth providers or basic auth)", u.Name)
		}
		cfg.Token, cfg.TokenFile = u.User.Token, rel(u.User.TokenFile)
		certPEM, err := dataOrFile(u.User.ClientCertificateData, rel(u.User.ClientCertificate))
		if err != nil {
			return nil, bad("user %q: client-certificate: %v", u.Name, err)
		}
		keyPEM, err := dataOrFile(u.User.ClientKeyData, rel(u.User.ClientKey))
		if err != nil {
			return nil, bad("user %q: client-key: %v", u.Name, err)
		}
		if (certPEM == nil) != (keyPEM == nil) {
			return nil, bad("user %q: a client certificate needs its key, and the key its certificate", u.Name)
		}
		if certPEM != nil {
			c, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				return nil, bad("user %q: client certificate: %v", u.Name, err)
			}
			cfg.Cert = &c
		}
		return cfg, nil
	}
	if ctx.User != "" {
		return nil, bad("no user %q", ctx.User)
	}
	return cfg, nil
}

// dataOrFile is a kubeconfig's "-data" field (base64) or its file.
func dataOrFile(b64, file string) ([]byte, error) {
	switch {
	case b64 != "":
		b, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, fmt.Errorf("-data is not base64: %w", err)
		}
		return b, nil
	case file != "":
		return os.ReadFile(file)
	}
	return nil, nil
}

var errNoServer = errors.New("kube: config has no server")
