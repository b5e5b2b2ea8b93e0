package hbone

// flow is the flow control of a connection or a stream, both directions:
// the peer's window we send within, and ours it sends within with the
// credit not yet returned. conn and Stream embed one by value (no
// allocation); it is guarded by c.mu, as the rest of its owner's state.
type flow struct {
	send    int64 // what we may still send: the peer's window
	recv    int64 // what the peer may still send us
	unacked int64 // received and consumed, not yet returned by WINDOW_UPDATE
}

// maxWindow is the largest flow-control window (RFC 9113 6.9.1).
const maxWindow = 1<<31 - 1

// avail is what we may send now.
func (f *flow) avail() int64 { return f.send }

// take spends n of the send window.
func (f *flow) take(n int64) { f.send -= n }

// add changes the send window by n: a WINDOW_UPDATE, or the change of
// SETTINGS_INITIAL_WINDOW_SIZE (negative too). False: it overflowed.
func (f *flow) add(n int64) bool {
	f.send += n
	return f.send <= maxWindow
}

// receive counts n bytes the peer sent. False: it overran our window.
func (f *flow) receive(n int64) bool {
	f.recv -= n
	return f.recv >= 0
}

// credit returns n consumed bytes to the peer, in batches of half of size
// (the window advertised) so WINDOW_UPDATEs stay rare: it returns the
// increment to send now, or 0 when the batch is not full yet.
func (f *flow) credit(n int64, size int32) uint32 {
	f.unacked += n
	if f.unacked < int64(size)/2 {
		return 0
	}
	inc := f.unacked
	f.recv += inc
	f.unacked = 0
	return uint32(inc)
}

// creditConnLocked returns n consumed bytes to the peer's connection window.
func (c *conn) creditConnLocked(n int64) {
	if inc := c.flow.credit(n, c.cfg.ConnWindow); inc > 0 {
		c.queue(outFrame{kind: kindWindow, val: inc})
	}
}

// creditLocked returns consumed bytes to the stream's window.
func (s *Stream) creditLocked(n int64) {
	if s.reof || s.reset {
		return // the peer will send nothing more
	}
	if inc := s.flow.credit(n, s.c.cfg.StreamWindow); inc > 0 {
		s.c.queue(outFrame{kind: kindWindow, streamID: s.id, val: inc})
	}
}
