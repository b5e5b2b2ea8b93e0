package proxy

import (
	"fmt"
	"net/netip"
	"sync"

	"github.com/ambitmesh/ambit/internal/identity"
)

// Defaults of Options.MaxDials and MaxPeerDials.
const (
	DefaultMaxDials     = 1024
	DefaultMaxPeerDials = 256
)

// dialKey names the peer a dial is made for: its verified identity, or,
// in plaintext, its address.
type dialKey struct {
	id identity.ID
	ip netip.Addr
}

func dialKeyOf(in *inboundReq) dialKey {
	if !in.peer.IsZero() {
		return dialKey{id: in.peer}
	}
	return dialKey{ip: in.src.Addr()}
}

// dialLimits counts the connections to applications being set up, in all
// and by peer.
type dialLimits struct {
	max, perPeer int

	mu    sync.Mutex
	total int
	peers map[dialKey]int
}

func newDialLimits(max, perPeer int) dialLimits {
	if max <= 0 {
		max = DefaultMaxDials
	}
	if perPeer <= 0 {
		perPeer = DefaultMaxPeerDials
	}
	return dialLimits{max: max, perPeer: perPeer, peers: map[dialKey]int{}}
}

// acquire counts a dial for k, or says which bound it is over; release
// ends one that acquire counted.
func (l *dialLimits) acquire(k dialKey) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.peers[k] >= l.perPeer {
		return fmt.Errorf("this peer has %d connections to applications being set up (the limit per peer)", l.perPeer)
	}
	if l.total >= l.max {
		return fmt.Errorf("the proxy has %d connections to applications being set up (its limit)", l.max)
	}
	l.peers[k]++
	l.total++
	return nil
}

func (l *dialLimits) release(k dialKey) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.peers[k]--; l.peers[k] <= 0 {
		delete(l.peers, k)
	}
}

// inFlight is how many dials are counted now, for tests.
func (l *dialLimits) inFlight() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}
