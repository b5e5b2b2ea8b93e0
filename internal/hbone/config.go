package hbone

import "time"

// Config tunes the HTTP/2 layer. Zero fields take the defaults, which are
// ztunnel's.
type Config struct {
	StreamWindow   int32         // receive window per stream; default 4 MiB
	ConnWindow     int32         // receive window per connection; default 16 MiB
	MaxFrameSize   uint32        // largest DATA frame we accept; default 1 MiB
	MaxStreams     uint32        // client: streams per connection (and at most the peer's limit), default 100; server: advertised limit, default 200
	PingInterval   time.Duration // keepalive PING period, both sides; default 10 s
	PingTimeout    time.Duration // close after this long with nothing read, both sides; default 20 s
	IdleTimeout    time.Duration // client: close a pooled connection with no stream for this long; default 5 min
	ConnectTimeout time.Duration // TCP connect plus TLS handshake; default 10 s

	// Server-side bounds on what one peer can make the server do (see
	// docs/reliability.md for what each costs and what it held).

	// ServerIdleTimeout closes (GOAWAY NO_ERROR) a connection that has
	// carried no stream for this long; default 10 min, twice the client's
	// pool timeout, so a well-behaved client is the one that closes.
	ServerIdleTimeout time.Duration
	// ResetBurst and ResetRate bound the streams a peer resets before
	// their answer (rapid reset, CVE-2023-44487), or makes the server
	// reset or refuse (a flow-control or protocol error on a stream,
	// "MadeYouReset", CVE-2025-8671): a bucket of ResetBurst refilled at
	// ResetRate per second; the peer that empties it gets GOAWAY
	// ENHANCE_YOUR_CALM. Defaults 200 (one connection's worth of streams)
	// and 20 per second.
	ResetBurst int
	ResetRate  float64
	// MaxControlFrames bounds the frames the server owes the peer and has
	// not written yet (PING and SETTINGS acknowledgements, RST_STREAM,
	// WINDOW_UPDATE): a peer that sends PINGs and never reads the answers
	// loses its connection instead of growing the heap. Default 10,000
	// (x/net/http2's server uses the same bound).
	MaxControlFrames int
	// MaxPeerStreams bounds the streams one peer identity holds on this
	// server across all its connections, MaxServerStreams those of all
	// peers together; a stream beyond either is refused (REFUSED_STREAM).
	// Defaults 16,384 and 65,536: each stream holds a socket to the app.
	MaxPeerStreams   int
	MaxServerStreams int
}

// Defaults.
const (
	DefaultStreamWindow   = 4 << 20
	DefaultConnWindow     = 16 << 20
	DefaultMaxFrameSize   = 1 << 20
	DefaultClientStreams  = 100
	DefaultServerStreams  = 200
	DefaultPingInterval   = 10 * time.Second
	DefaultPingTimeout    = 20 * time.Second
	DefaultIdleTimeout    = 5 * time.Minute
	DefaultConnectTimeout = 10 * time.Second

	DefaultServerIdleTimeout = 10 * time.Minute
	DefaultResetBurst        = 200
	DefaultResetRate         = 20
	DefaultMaxControlFrames  = 10000
	DefaultMaxPeerStreams    = 16384
	DefaultMaxServerStreams  = 65536
)

// maxContinuations bounds the CONTINUATION frames after one HEADERS, as
// nghttp2 (8) and the h2 crate under ztunnel (5 for these frame and list
// sizes) do since CVE-2024-27316: x/net's Framer bounds the decoded size
// of a header block but not its frame count, so a block of empty
// CONTINUATION frames never ended. Ambit's and ztunnel's requests fit in
// one frame.
const maxContinuations = 8

// maxHeaderListSize is the SETTINGS_MAX_HEADER_LIST_SIZE both sides
// advertise and enforce: a larger request is answered 431.
const maxHeaderListSize = 64 << 10

func (c Config) withDefaults(server bool) Config {
	if c.StreamWindow <= 0 {
		c.StreamWindow = DefaultStreamWindow
	}
	if c.ConnWindow <= 0 {
		c.ConnWindow = DefaultConnWindow
	}
	if c.ConnWindow < 65535 {
		c.ConnWindow = 65535
	}
	if c.MaxFrameSize == 0 {
		c.MaxFrameSize = DefaultMaxFrameSize
	}
	c.MaxFrameSize = min(max(c.MaxFrameSize, 16384), 1<<24-1)
	if c.MaxStreams == 0 {
		c.MaxStreams = DefaultClientStreams
		if server {
			c.MaxStreams = DefaultServerStreams
		}
	}
	if c.PingInterval <= 0 {
		c.PingInterval = DefaultPingInterval
	}
	if c.PingTimeout <= 0 {
		c.PingTimeout = DefaultPingTimeout
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.ConnectTimeout <= 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.ServerIdleTimeout <= 0 {
		c.ServerIdleTimeout = DefaultServerIdleTimeout
	}
	if c.ResetBurst <= 0 {
		c.ResetBurst = DefaultResetBurst
	}
	if c.ResetRate <= 0 {
		c.ResetRate = DefaultResetRate
	}
	if c.MaxControlFrames <= 0 {
		c.MaxControlFrames = DefaultMaxControlFrames
	}
	if c.MaxPeerStreams <= 0 {
		c.MaxPeerStreams = DefaultMaxPeerStreams
	}
	if c.MaxServerStreams <= 0 {
		c.MaxServerStreams = DefaultMaxServerStreams
	}
	return c
}
