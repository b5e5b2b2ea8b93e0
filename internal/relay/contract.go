package relay

import "io"

// The data path's contracts: how an HBONE stream, a relay Socket and a node
// proxy's connection records hand bytes and ends to each other. They are the
// fast path's joints (see docs/data-path-contracts.md): each is a type
// assertion or an interface call at run time, so a signature that drifted
// would compile and quietly fall back to a goroutine and a buffer per
// direction — 10,000 idle connections would no longer fit in 40 MB. The
// implementations assert them at compile time instead:
//
//	var _ relay.AsyncSource = (*hbone.Stream)(nil) // internal/hbone
//	var _ relay.NowWriter = (*relay.Socket)(nil)   // here
//	var _ relay.Finisher = (*liveConn)(nil)        // internal/proxy

// AsyncSource copies itself to w with no goroutine while idle, and tells
// done the end (what io.WriterTo would return), once. It reports false, and
// does nothing, when it cannot (w is not a socket): the relay then copies
// with a goroutine. *hbone.Stream is one: its connection's reader writes
// arriving DATA to the socket itself.
type AsyncSource interface {
	WriteToAsync(w io.Writer, done AsyncDone) bool
}

// AsyncDone is told the end of an AsyncSource's copy. An interface, so the
// relay's state takes it with no closure allocated (and kept) per
// connection.
type AsyncDone interface {
	AsyncDone(n int64, err error)
}

// NowWriter writes what a socket takes at once and never waits: 0 and no
// error when it is full. An HBONE stream's reader writes arriving data to
// its relay's socket with it and queues what does not fit. *Socket is one.
type NowWriter interface {
	WriteNow(p []byte) (int, error)
}

// A Finisher is told a relay's result (GoFinisher), once, from the
// goroutine that ended last. A node proxy's record of a connection takes
// it as a method, where a func would be a closure allocated per connection
// and kept for its life.
type Finisher interface{ Finish(Result) }

var (
	_ NowWriter = (*Socket)(nil)
	_ AsyncDone = (*asyncEnd)(nil)
	_ Conn      = (*Socket)(nil)
)
