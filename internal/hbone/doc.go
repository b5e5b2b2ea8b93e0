// Package hbone is the mesh's tunnel protocol, HBONE: HTTP/2 CONNECT
// streams, nothing else, over TLS 1.3 with mutual authentication, each
// side named by the SPIFFE id in its certificate, on port 15008. Dialer
// opens streams over pooled connections; Server takes each CONNECT to a
// Handler; a Stream is the tunnel, a net.Conn with half-close.
//
// The HTTP/2 engine is its own (docs/hbone-http2.md says why), on
// x/net/http2's Framer and hpack. It is deliberately small: HBONE needs
// HEADERS, DATA, flow control, RST_STREAM, PING and GOAWAY, and the stream
// is a byte pipe with half-close in both directions, which a generic
// HTTP/2 server cannot give a handler.
//
// # Files
//
// The connection is split by concern, as x/net/http2's server is:
//
//	conn.go     conn: its state, set-up, start, the streams it holds,
//	            idle and keepalive timers, GOAWAY and close
//	write.go    frames out: the queue, the write token, the writer
//	            goroutine, drain and flush (with cork.go's corking)
//	read.go     frames in: the read loop and its framer, dispatch by type
//	frames.go   a handler per frame type (onData, onHeaders, ...)
//	flow.go     flow control: one flow type, a connection's and a stream's
//	stream.go   Stream: Read, Write, half-close, Close, deadlines
//	sink.go     received bytes to a socket: WriteTo, WriteToAsync, NowWriter
//	recvbuf.go  received bytes in pooled chunks
//	limits.go   the abuse bounds: CONTINUATIONs, the reset budget, streams
//	            per peer and per server, the server's stream slots
//	client.go   Dialer and its pool; server.go: Server and CONNECT answers
//	tls.go      mTLS and SPIFFE ids; headers.go: authority, Forwarded,
//	            baggage, traceparent; config.go, errors.go
//
// # Goroutines and locks
//
// One goroutine reads a connection while it lives: readLoop (frames in;
// on a server, the goroutine that accepted the connection). It owns the
// read framer and the reset budget. Frames out are written by whoever
// holds the write token (conn.writing), the only writer of the socket,
// which owns the write buffer and framer while it holds it: a
// Stream.Write that finds the connection idle takes it and writes its
// DATA itself, sparing two goroutine hand-offs per chunk (see
// docs/benchmarks.md); frames queued while nobody holds it start a writer
// goroutine (writeQueued) that drains the queue and ends, so an idle
// connection holds no writer and its stack. readLoop never takes the
// token: it only queues, so a reader never waits on a writer. Keepalive
// and idleness are timers (pingFired, idleFired), not goroutines. A
// server runs each stream's handler in a goroutine (newStream), and
// WriteToAsync runs one only while bytes wait (Stream.drain). All end when
// the connection closes.
//
// conn.mu guards the rest, the connection's and its streams' alike: the
// queue and token, the streams, settings and windows (flow), timers and
// the connection's life; a stream waits on a sync.Cond over it.
// Stream.wmu only orders one stream's Write and CloseWrite. The fields of
// conn and Stream are grouped by these owners.
package hbone
