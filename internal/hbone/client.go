package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/ambitmesh/ambit/internal/identity"
	"golang.org/x/net/http2/hpack"
)

// CertSource gives the current certificate of an identity, waiting for the
// first one if needed. *identity.Manager is one.
type CertSource interface {
	Get(ctx context.Context, id identity.ID) (*identity.Certificate, error)
}

// Request says what tunnel to open.
type Request struct {
	Source     identity.ID    // whose certificate the client presents
	Expected   []identity.ID  // server identities accepted (any one)
	Address    netip.AddrPort // the HBONE endpoint, ip:15008
	SourceAddr netip.Addr     // optional local IP to dial from; part of the pool key
	Authority  netip.AddrPort // the target, ip:port, sent as :authority
	// Header carries extra request headers (forwarded, baggage, ...). A
	// traceparent is added when absent.
	Header http.Header
}

// Dialer opens HBONE streams over pooled connections: one pool key is
// {source identity, expected identities, address, source IP}; a key's
// connections carry up to MaxStreams streams each (and at most the peer's
// limit); a new connection is dialed, once per key, when all are full.
type Dialer struct {
	Certs  CertSource
	Config Config
	Log    *slog.Logger // nil: discard
	// DialTCP replaces the TCP dial, e.g. to bind a transparent source or set
	// a socket mark. nil: a plain dial from SourceAddr if set.
	DialTCP func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)

	once    sync.Once
	cfg     Config
	log     *slog.Logger
	mu      sync.Mutex
	closed  bool
	conns   map[poolKey][]*conn
	dialing map[poolKey]*dialCall
	all     map[*conn]struct{}
}

// Streams to one destination spread over up to spreadConns connections
// once one carries spreadAt: a connection's frames are read and decrypted
// by one goroutine, so a second connection lets busy streams use a second
// core. Past that, connections fill up to MaxStreams before another opens,
// so thousands of idle streams still share few connections.
const (
	spreadConns = 2
	spreadAt    = 4
)

type poolKey struct {
	src      identity.ID
	expected string // sorted, joined
	addr     netip.AddrPort
	srcIP    netip.Addr
}

type dialCall struct {
	done chan struct{}
	c    *conn
	err  error
}

func (d *Dialer) init() {
	d.once.Do(func() {
		d.cfg = d.Config.withDefaults(false)
		d.log = d.Log
		if d.log == nil {
			d.log = slog.New(slog.DiscardHandler)
		}
		d.conns = map[poolKey][]*conn{}
		d.dialing = map[poolKey]*dialCall{}
		d.all = map[*conn]struct{}{}
	})
}

// Dial opens a stream to req.Authority through the HBONE endpoint and waits
// for the CONNECT answer. A non-200 answer is a *StatusError.
func (d *Dialer) Dial(ctx context.Context, req Request) (*Stream, error) {
	d.init()
	if d.Certs == nil {
		return nil, errors.New("hbone dial: Dialer has no Certs")
	}
	if err := req.validate(); err != nil {
		return nil, err
	}
	key := req.key()
	for attempt := 0; ; attempt++ {
		c, reused, err := d.get(ctx, key, req)
		if err != nil {
			return nil, err
		}
		s, err := d.open(ctx, c, req, reused)
		if errors.Is(err, errGoingAway) && attempt < 3 {
			continue // the connection was draining; take another
		}
		if err != nil {
			return nil, err
		}
		return s, nil
	}
}

func (r *Request) validate() error {
	if err := r.Source.Validate(); err != nil {
		return fmt.Errorf("hbone dial: source identity: %w", err)
	}
	if len(r.Expected) == 0 {
		return errors.New("hbone dial: no expected server identity")
	}
	if !r.Address.IsValid() {
		return errors.New("hbone dial: no HBONE address")
	}
	if !r.Authority.IsValid() || r.Authority.Port() == 0 {
		return fmt.Errorf("hbone dial: invalid authority %v", r.Authority)
	}
	return nil
}

func (r *Request) key() poolKey {
	ids := make([]string, len(r.Expected))
	for i, id := range r.Expected {
		ids[i] = id.String()
	}
	slices.Sort(ids)
	return poolKey{src: r.Source, expected: strings.Join(ids, ","), addr: r.Address, srcIP: r.SourceAddr}
}

// get returns a connection of key with a reserved stream slot, dialing one
// if none has room. Callers of the same key wait for a single dial.
func (d *Dialer) get(ctx context.Context, key poolKey, req Request) (*conn, bool, error) {
	for {
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			return nil, false, errors.New("hbone dial: dialer closed")
		}
		// The least loaded connection takes the stream, unless all carry
		// spreadAt streams or more and there are fewer than spreadConns:
		// then a new connection is dialed first.
		conns := d.conns[key]
		var best *conn
		bestLoad := 0
		for _, c := range conns {
			if l, open := c.load(); open && (best == nil || l < bestLoad) {
				best, bestLoad = c, l
			}
		}
		spread := best != nil && bestLoad >= spreadAt && len(conns) < spreadConns
		if best != nil && !spread && best.tryReserve() {
			d.mu.Unlock()
			return best, true, nil
		}
		call, waiting := d.dialing[key]
		if !waiting {
			call = &dialCall{done: make(chan struct{})}
			d.dialing[key] = call
		}
		d.mu.Unlock()

		if waiting {
			select {
			case <-call.done:
			case <-ctx.Done():
				return nil, false, fmt.Errorf("hbone dial %s: %w", req.Address, ctx.Err())
			}
			if call.err != nil {
				return nil, false, call.err
			}
			continue // the new connection may already be full: look again
		}

		c, err := d.dialConn(ctx, key, req)
		d.mu.Lock()
		delete(d.dialing, key)
		if err == nil {
			if d.closed {
				err = errors.New("hbone dial: dialer closed")
			} else {
				d.conns[key] = append(d.conns[key], c)
				d.all[c] = struct{}{}
			}
		}
		call.c, call.err = c, err
		close(call.done)
		d.mu.Unlock()
		if err != nil {
			if c != nil {
				c.closeWithError(err)
			}
			return nil, false, err
		}
		if c.tryReserve() {
			return c, false, nil
		}
	}
}

// dialConn makes a TCP connection, the TLS handshake and the HTTP/2 preface.
func (d *Dialer) dialConn(ctx context.Context, key poolKey, req Request) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.ConnectTimeout)
	defer cancel()
	cert, err := d.Certs.Get(ctx, req.Source)
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: certificate for %s: %w", req.Address, req.Source, err)
	}
	var nc net.Conn
	if d.DialTCP != nil {
		nc, err = d.DialTCP(ctx, req.SourceAddr, req.Address)
	} else {
		var nd net.Dialer
		if req.SourceAddr.IsValid() {
			nd.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(req.SourceAddr, 0))
		}
		nc, err = nd.DialContext(ctx, "tcp", req.Address.String())
	}
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: %w", req.Address, err)
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		_ = tc.SetKeepAlive(true)
	}
	tc := tls.Client(newCorkConn(nc), clientTLS(cert, req.Expected))
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, fmt.Errorf("hbone dial %s: TLS handshake: %w", req.Address, err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != alpnH2 {
		tc.Close()
		return nil, fmt.Errorf("hbone dial %s: server negotiated ALPN %q, want %q", req.Address, p, alpnH2)
	}
	if _, err := io.WriteString(tc, clientPreface); err != nil {
		tc.Close()
		return nil, fmt.Errorf("hbone dial %s: preface: %w", req.Address, err)
	}
	c := newConn(tc, true, d.cfg, d.log)
	deadline, _ := ctx.Deadline()
	if err := c.readPeerSettings(deadline); err != nil {
		tc.Close()
		return nil, fmt.Errorf("hbone dial %s: waiting for the server's SETTINGS: %w", req.Address, err)
	}
	c.onIdle = func(c *conn) { d.remove(key, c) }
	c.onClose = func(c *conn) { d.remove(key, c) }
	c.start()
	d.log.Debug("hbone connection established", "addr", req.Address, "src", req.Source, "peer", peerID(c.tls))
	return c, nil
}

func (d *Dialer) remove(key poolKey, c *conn) {
	d.mu.Lock()
	defer d.mu.Unlock()
	list := d.conns[key]
	if i := slices.Index(list, c); i >= 0 {
		list = slices.Delete(list, i, i+1)
		if len(list) == 0 {
			delete(d.conns, key)
		} else {
			d.conns[key] = list
		}
	}
	delete(d.all, c)
}

// requestFields are a CONNECT's header fields. A traceparent is new on
// every stream, and so is Forwarded (it names the client's port): they are
// sent never indexed. In the HPACK dynamic table they would only push out
// what repeats (the authority, baggage) and keep ~8 KB of unique strings
// per connection on each side (0.85 MB per proxy at 10,000 streams over
// 100 connections).
func requestFields(req Request) []hpack.HeaderField {
	fields := []hpack.HeaderField{
		{Name: ":method", Value: http.MethodConnect},
		{Name: ":authority", Value: req.Authority.String()},
	}
	hasTrace := false
	for k, vs := range req.Header {
		lk := strings.ToLower(k)
		unique := lk == "traceparent" || lk == "forwarded"
		hasTrace = hasTrace || lk == "traceparent"
		for _, v := range vs {
			fields = append(fields, hpack.HeaderField{Name: lk, Value: v, Sensitive: unique})
		}
	}
	if !hasTrace {
		fields = append(fields, hpack.HeaderField{Name: "traceparent", Value: NewTraceparent(), Sensitive: true})
	}
	return fields
}

// open starts the CONNECT stream on a connection with a reserved slot
// and waits for the answer.
func (d *Dialer) open(ctx context.Context, c *conn, req Request, reused bool) (*Stream, error) {
	s, err := c.openStream(requestFields(req), reused)
	if err != nil {
		return nil, fmt.Errorf("hbone dial %s: %w", req.Address, err)
	}
	status, hdr, err := s.waitResponse(ctx)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("hbone CONNECT %s via %s: %w", req.Authority, req.Address, err)
	}
	if status != http.StatusOK {
		s.Close()
		return nil, &StatusError{Status: status, Reason: hdr.Get(reasonHeader)}
	}
	return s, nil
}

// Stats reports the pool's size: connections and open streams.
func (d *Dialer) Stats() (conns, streams int) {
	d.init()
	d.mu.Lock()
	all := slices.Collect(maps.Keys(d.all))
	d.mu.Unlock()
	for _, c := range all {
		streams += c.activeStreams()
	}
	return len(all), streams
}

// Close closes every pooled connection and its streams.
func (d *Dialer) Close() error {
	d.init()
	d.mu.Lock()
	d.closed = true
	all := slices.Collect(maps.Keys(d.all))
	d.mu.Unlock()
	for _, c := range all {
		c.closeGracefully(ErrConnClosed)
		c.wait()
	}
	return nil
}
