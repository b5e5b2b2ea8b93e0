// Package identity holds who a workload is and how it proves it: SPIFFE IDs,
// the certificate authority that signs workload certificates, and the
// manager that keeps one live certificate per identity.
//
// It knows about crypto and files, never about sockets or the mesh.
package identity

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// ID is an Istio-style SPIFFE identity: spiffe://<trust domain>/ns/<ns>/sa/<sa>.
// The zero ID is not valid; use Parse or New.
type ID struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

const spiffePrefix = "spiffe://"

// maxIDLength bounds what Parse reads; the SPIFFE spec caps a URI at 2048 bytes.
const maxIDLength = 2048

// New builds an ID from its parts and checks each of them.
func New(trustDomain, namespace, serviceAccount string) (ID, error) {
	id := ID{TrustDomain: trustDomain, Namespace: namespace, ServiceAccount: serviceAccount}
	if err := id.Validate(); err != nil {
		return ID{}, err
	}
	return id, nil
}

// Parse reads a SPIFFE ID strictly: lower-case scheme and trust domain, the
// path exactly /ns/<namespace>/sa/<service account>, no port, user, query,
// fragment or percent-encoding.
func Parse(s string) (ID, error) {
	if len(s) > maxIDLength {
		return ID{}, fmt.Errorf("spiffe id: longer than %d bytes", maxIDLength)
	}
	rest, ok := strings.CutPrefix(s, spiffePrefix)
	if !ok {
		return ID{}, fmt.Errorf("spiffe id %q: must start with %q", s, spiffePrefix)
	}
	td, path, ok := strings.Cut(rest, "/")
	if !ok {
		return ID{}, fmt.Errorf("spiffe id %q: no path (want /ns/<namespace>/sa/<service account>)", s)
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return ID{}, fmt.Errorf("spiffe id %q: path must be /ns/<namespace>/sa/<service account>", s)
	}
	id := ID{TrustDomain: td, Namespace: parts[1], ServiceAccount: parts[3]}
	if err := id.Validate(); err != nil {
		return ID{}, fmt.Errorf("spiffe id %q: %w", s, err)
	}
	return id, nil
}

// ParsePrincipal reads the form Istio policies use: the ID without "spiffe://".
func ParsePrincipal(s string) (ID, error) {
	if strings.HasPrefix(s, spiffePrefix) {
		return ID{}, fmt.Errorf("principal %q: must not carry the spiffe:// scheme", s)
	}
	return Parse(spiffePrefix + s)
}

// Validate reports what is wrong with an ID, if anything.
func (id ID) Validate() error {
	if err := validTrustDomain(id.TrustDomain); err != nil {
		return err
	}
	if err := validSegment("namespace", id.Namespace); err != nil {
		return err
	}
	return validSegment("service account", id.ServiceAccount)
}

// IsZero reports whether id is the zero ID (no identity).
func (id ID) IsZero() bool { return id == ID{} }

// String formats the ID as a SPIFFE URI.
func (id ID) String() string {
	if id.IsZero() {
		return ""
	}
	return spiffePrefix + id.Principal()
}

// Principal is the ID without its scheme, as Istio policies write it.
func (id ID) Principal() string {
	if id.IsZero() {
		return ""
	}
	return id.TrustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

// URL is the ID as a URI SAN for a certificate.
func (id ID) URL() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// Compare orders IDs by their string form; it returns -1, 0 or +1.
func (id ID) Compare(other ID) int {
	return strings.Compare(id.String(), other.String())
}

// MarshalText lets an ID appear in JSON and logs as its URI.
func (id ID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText parses a SPIFFE URI.
func (id *ID) UnmarshalText(b []byte) error {
	p, err := Parse(string(b))
	if err != nil {
		return err
	}
	*id = p
	return nil
}

func validTrustDomain(td string) error {
	if td == "" {
		return errors.New("empty trust domain")
	}
	if len(td) > 255 {
		return errors.New("trust domain longer than 255 bytes")
	}
	for i := 0; i < len(td); i++ {
		c := td[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '.', c == '-', c == '_':
		case c >= 'A' && c <= 'Z':
			return fmt.Errorf("trust domain %q: upper-case letters are not allowed", td)
		default:
			return fmt.Errorf("trust domain %q: character %q is not allowed", td, c)
		}
	}
	return nil
}

// validSegment allows what the SPIFFE spec allows in a path segment
// (letters, digits, '.', '-', '_'), minus the relative segments.
func validSegment(what, s string) error {
	if s == "" {
		return fmt.Errorf("empty %s", what)
	}
	if s == "." || s == ".." {
		return fmt.Errorf("%s %q: relative path segments are not allowed", what, s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-', c == '_':
		default:
			return fmt.Errorf("%s %q: character %q is not allowed", what, s, c)
		}
	}
	return nil
}
