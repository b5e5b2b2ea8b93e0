package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/listener"
	"golang.org/x/net/http2/hpack"
)

// ServerRequest is one CONNECT as the handler sees it: the peer is verified,
// the authority parsed.
type ServerRequest struct {
	Peer             identity.ID
	PeerCertificates []*x509.Certificate
	Authority        netip.AddrPort
	Header           http.Header
	LocalAddr        netip.AddrPort // where the TLS connection arrived (the HBONE address)
	RemoteAddr       netip.AddrPort // where it came from

	s        *Stream
	detached bool
}

// Accept answers 200 and returns the stream for the tunnelled bytes. Call it
// only once the upstream is connected: the client takes 200 to mean so.
// header is added to the answer (e.g. the destination's baggage).
func (r *ServerRequest) Accept(header http.Header) (*Stream, error) {
	if err := r.s.respond(http.StatusOK, header, ""); err != nil {
		return nil, err
	}
	return r.s, nil
}

// Detach hands the accepted stream to the caller: the handler may return
// while the stream lives on, and whoever holds it must Close it. Call it
// from the handler, after Accept.
func (r *ServerRequest) Detach() { r.detached = true }

// Reject answers with status (400, 401, 503 ...) and ends the stream; reason
// goes to the client in the x-ambit-reason header.
func (r *ServerRequest) Reject(status int, reason string) error {
	if status == http.StatusOK {
		return errors.New("hbone: Reject with status 200")
	}
	return r.s.respond(status, nil, reason)
}

// Handler serves CONNECTs. It must Accept or Reject; if it returns without
// either, the client gets 503. The stream is closed when it returns, unless
// the handler called Detach.
type Handler interface {
	ServeHBONE(ctx context.Context, r *ServerRequest)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, r *ServerRequest)

func (f HandlerFunc) ServeHBONE(ctx context.Context, r *ServerRequest) { f(ctx, r) }

// Server terminates HBONE: TLS 1.3 with a client certificate from the mesh,
// HTTP/2, and a plain CONNECT per tunnel.
type Server struct {
	// GetCertificate returns the certificate to present for a connection
	// addressed to local: the destination pod's identity.
	GetCertificate func(ctx context.Context, local netip.Addr) (*identity.Certificate, error)
	Handler        Handler
	Config         Config
	Log            *slog.Logger // nil: discard

	once      sync.Once
	cfg       Config
	log       *slog.Logger
	ctx       context.Context
	cancel    context.CancelFunc
	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	raw       map[net.Conn]struct{} // connections still in handshake
	limits    *streamLimits
	closing   bool
	wg        sync.WaitGroup
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("hbone: server closed")

func (s *Server) init() {
	s.once.Do(func() {
		s.cfg = s.Config.withDefaults(true)
		s.log = s.Log
		if s.log == nil {
			s.log = slog.New(slog.DiscardHandler)
		}
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.listeners = map[net.Listener]struct{}{}
		s.conns = map[*conn]struct{}{}
		s.raw = map[net.Conn]struct{}{}
		s.limits = newStreamLimits(s.cfg)
	})
}

// Serve accepts connections on l until Shutdown or Close. l is guarded
// (listener.Guard) unless it already is: a failing accept(2), out of
// descriptors, backs off and sheds instead of ending the loop.
func (s *Server) Serve(l net.Listener) error {
	s.init()
	if s.GetCertificate == nil || s.Handler == nil {
		return errors.New("hbone: Server needs GetCertificate and Handler")
	}
	l = listener.Guard(l, listener.Options{Name: "hbone", Log: s.log})
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	for {
		nc, err := l.Accept()
		if err != nil { // only once l is closed
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			return fmt.Errorf("hbone accept: %w", err)
		}
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			nc.Close()
			return ErrServerClosed
		}
		s.raw[nc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.serveConn(nc)
		}()
	}
}

// serveConn runs the handshake and then the HTTP/2 connection.
func (s *Server) serveConn(nc net.Conn) {
	c := s.handshake(nc)
	if c == nil {
		return
	}
	c.serve()
	s.limits.leave(c.peer, c.peerN)
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// handshake runs TLS and the HTTP/2 preface and registers the connection;
// nil if it failed (and nc is closed). Apart from serveConn because its
// frame is large (~750 bytes): an idle connection's reader keeps serveConn's
// frame on its stack, and with this one under it the parked reader used
// more than a quarter of a 16 KiB stack, which the runtime then never
// shrinks to 8 KiB (100 HBONE connections: 0.8 MB).
func (s *Server) handshake(nc net.Conn) *conn {
	remote := nc.RemoteAddr()
	forget := func() {
		s.mu.Lock()
		delete(s.raw, nc)
		s.mu.Unlock()
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.ConnectTimeout)
	defer cancel()
	tc := tls.Server(newCorkConn(nc), &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			local, _ := netip.ParseAddrPort(hello.Conn.LocalAddr().String())
			cert, err := s.GetCertificate(hello.Context(), local.Addr().Unmap())
			if err != nil {
				return nil, fmt.Errorf("no certificate for %s: %w", local.Addr(), err)
			}
			return serverTLS(cert), nil
		},
	})
	if err := tc.HandshakeContext(ctx); err != nil {
		forget()
		nc.Close()
		s.log.Warn("hbone: TLS handshake failed", "peer", remote, "err", err)
		return nil
	}
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol != alpnH2 {
		forget()
		tc.Close()
		s.log.Warn("hbone: client did not negotiate h2", "peer", remote, "alpn", cs.NegotiatedProtocol)
		return nil
	}
	_ = tc.SetReadDeadline(time.Now().Add(s.cfg.ConnectTimeout))
	var preface [len(clientPreface)]byte
	if _, err := io.ReadFull(tc, preface[:]); err != nil || string(preface[:]) != clientPreface {
		forget()
		tc.Close()
		s.log.Warn("hbone: bad HTTP/2 preface", "peer", remote, "err", err)
		return nil
	}
	_ = tc.SetReadDeadline(time.Time{})

	c := newConn(tc, false, s.cfg, s.log)
	c.newStream = s.handleStream
	s.mu.Lock()
	delete(s.raw, nc)
	if s.closing {
		s.mu.Unlock()
		tc.Close()
		return nil
	}
	c.limits, c.peerN = s.limits, s.limits.join(c.peer)
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	return c
}

// handleStream validates one CONNECT and hands it to the handler. ctx
// ends when the stream is gone: the peer reset it, or the connection
// closed (as Shutdown does once its drain is over).
func (s *Server) handleStream(ctx context.Context, st *Stream) {
	c := st.c
	var req *ServerRequest
	defer func() {
		if req == nil || !req.detached {
			st.Close()
		}
	}()
	if st.method != http.MethodConnect || st.extended {
		_ = st.respond(http.StatusBadRequest, nil, fmt.Sprintf("method %q: HBONE takes only a plain CONNECT", st.method))
		s.log.Warn("hbone: refused request", "peer", c.peer, "method", st.method, "status", http.StatusBadRequest)
		return
	}
	auth, err := ParseAuthority(st.authority)
	if err != nil {
		_ = st.respond(http.StatusBadRequest, nil, err.Error())
		s.log.Warn("hbone: refused request", "peer", c.peer, "err", err, "status", http.StatusBadRequest)
		return
	}
	local, _ := netip.ParseAddrPort(c.nc.LocalAddr().String())
	remote, _ := netip.ParseAddrPort(c.nc.RemoteAddr().String())
	req = &ServerRequest{
		Peer:             c.peer,
		PeerCertificates: c.tls.PeerCertificates,
		Authority:        auth,
		Header:           st.header,
		LocalAddr:        netip.AddrPortFrom(local.Addr().Unmap(), local.Port()),
		RemoteAddr:       netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port()),
		s:                st,
	}
	if ctx.Err() != nil {
		return // reset before it got here: no work for a stream that is gone
	}
	s.Handler.ServeHBONE(ctx, req)
	c.mu.Lock()
	responded := st.responded
	st.header = nil // read by the handler; not kept for the stream's life
	c.mu.Unlock()
	if !responded {
		_ = st.respond(http.StatusServiceUnavailable, nil, "handler gave no answer")
	}
}

// respond sends the CONNECT answer. A non-200 answer ends the stream.
func (st *Stream) respond(status int, header http.Header, reason string) error {
	c := st.c
	fields := []hpack.HeaderField{{Name: ":status", Value: fmt.Sprint(status)}}
	for k, vs := range header {
		for _, v := range vs {
			fields = append(fields, hpack.HeaderField{Name: http.CanonicalHeaderKey(k), Value: v})
		}
	}
	if reason != "" {
		fields = append(fields, hpack.HeaderField{Name: reasonHeader, Value: reason})
	}
	for i := range fields {
		fields[i].Name = lower(fields[i].Name)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if st.responded {
		return errors.New("hbone: stream already answered")
	}
	st.responded = true
	st.status = status
	if st.reset || st.closed {
		if st.rerr != nil {
			return st.rerr
		}
		return ErrConnClosed
	}
	end := status != http.StatusOK
	c.queue(outFrame{kind: kindHeaders, streamID: st.id, end: end, data: c.encodeHeadersLocked(fields)})
	if end {
		st.wEOF = true
		if st.reof {
			c.removeLocked(st)
		} else {
			// The client may not send more: tell it so without error (RFC 9113 8.1).
			c.resetLocked(st, 0, false)
		}
	}
	return nil
}

func lower(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] >= 'A' && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// Shutdown stops accepting, sends GOAWAY on every connection and waits for
// their streams to end, or for ctx; then it closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	for nc := range s.raw {
		nc.Close()
	}
	conns := slices.Collect(maps.Keys(s.conns))
	s.mu.Unlock()
	for _, c := range conns {
		c.goAway()
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var err error
wait:
	for {
		busy := false
		for _, c := range conns {
			if c.activeStreams() > 0 {
				busy = true
			}
		}
		if !busy {
			break
		}
		select {
		case <-ctx.Done():
			err = ctx.Err()
			break wait
		case <-tick.C:
		}
	}
	for _, c := range conns {
		c.closeGracefully(ErrServerClosed)
	}
	s.cancel()
	s.wg.Wait()
	return err
}

// Close stops at once: listeners, connections and streams.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = s.Shutdown(ctx)
	return nil
}
