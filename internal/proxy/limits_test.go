package proxy

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/identity"
)

// The dials in flight are bounded per peer (identity, or address in
// plaintext) and for the proxy; a release makes room again.
func TestDialLimits(t *testing.T) {
	l := newDialLimits(5, 2)
	a := dialKeyOf(&inboundReq{peer: identity.ID{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: "a"}, src: netip.MustParseAddrPort("10.0.0.1:1")})
	b := dialKeyOf(&inboundReq{peer: identity.ID{TrustDomain: "cluster.local", Namespace: "ns", ServiceAccount: "b"}, src: netip.MustParseAddrPort("10.0.0.1:2")})
	plain := dialKeyOf(&inboundReq{src: netip.MustParseAddrPort("10.0.0.9:3")})
	if a == b || a == plain {
		t.Fatal("distinct peers share a key")
	}
	for range 2 {
		if err := l.acquire(a); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.acquire(a); err == nil || !strings.Contains(err.Error(), "per peer") {
		t.Fatalf("a third dial of one peer: %v, want the per-peer limit", err)
	}
	for _, k := range []dialKey{b, b, plain} {
		if err := l.acquire(k); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.acquire(plain); err == nil || !strings.Contains(err.Error(), "its limit") {
		t.Fatalf("a sixth dial: %v, want the proxy's limit", err)
	}
	l.release(a)
	if err := l.acquire(plain); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	for _, k := range []dialKey{a, b, b, plain, plain} {
		l.release(k)
	}
	if n := l.inFlight(); n != 0 || len(l.peers) != 0 {
		t.Fatalf("%d in flight and %d peers counted after every release", n, len(l.peers))
	}
	if d := newDialLimits(0, 0); d.max != DefaultMaxDials || d.perPeer != DefaultMaxPeerDials {
		t.Fatalf("defaults %d/%d", d.max, d.perPeer)
	}
}
