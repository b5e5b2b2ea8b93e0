package hbone

import "time"

// Config tunes the HTTP/2 layer. Zero fields take the defaults, which are
// ztunnel's.
type Config struct {
	StreamWindow   int32         // receive window per stream; default 4 MiB
	ConnWindow     int32         // receive window per connection; default 16 MiB
	MaxFrameSize   uint32        // largest DATA frame we accept; default 1 MiB
	MaxStreams     uint32        // client: streams per connection (and at most the peer's limit), default 100; server: advertised limit, default 200
	PingInterval   time.Duration // client keepalive PING period; default 10 s
	PingTimeout    time.Duration // close after this long with nothing read; default 20 s
	IdleTimeout    time.Duration // close a pooled connection with no stream for this long; default 5 min
	ConnectTimeout time.Duration // TCP connect plus TLS handshake; default 10 s
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
)

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
	return c
}
