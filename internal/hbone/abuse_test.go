package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The attacks of docs/reliability.md, each from a peer holding a valid
// mesh certificate and speaking raw frames (x/net's Framer) to a real
// Server over TLS on loopback. The proxy-level tests (cmd/ambit) run the
// same attacks against a proxy process and watch its memory.

// rawPeer is a mesh peer that writes whatever frames a test asks for.
type rawPeer struct {
	t    *testing.T
	tc   *tls.Conn
	w    *bufio.Writer
	fr   *http2.Framer // writes; reads too when the test reads by hand
	henc *hpack.Encoder
	hbuf bytes.Buffer

	events chan peerEvent // from read, once started
}

// peerEvent is what the server sent, as the reader saw it.
type peerEvent struct {
	kind   string // "goaway", "rst", "headers", "ping", "eof"
	stream uint32
	code   http2.ErrCode
	status string
	err    error
}

// dialRaw opens TLS to srv with clientID's certificate and sends the
// preface and an empty SETTINGS.
func dialRaw(t *testing.T, ca *identity.CA, srv netip.AddrPort) *rawPeer {
	t.Helper()
	cert := issue(t, ca, clientID)
	tc, err := tls.Dial("tcp", srv.String(), clientTLS(cert, []identity.ID{serverID}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	p := &rawPeer{t: t, tc: tc, w: bufio.NewWriterSize(tc, 64<<10)}
	p.fr = http2.NewFramer(p.w, tc)
	p.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	p.fr.SetMaxReadFrameSize(1 << 20)
	p.henc = hpack.NewEncoder(&p.hbuf)
	if _, err := p.w.WriteString(http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	p.fr.WriteSettings()
	p.flush()
	return p
}

func (p *rawPeer) flush() error { return p.w.Flush() }

// connect writes a CONNECT's HEADERS for stream id (extra fields after).
func (p *rawPeer) connect(id uint32, authority string, endHeaders bool, extra ...hpack.HeaderField) error {
	p.hbuf.Reset()
	p.henc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
	p.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
	for _, f := range extra {
		p.henc.WriteField(f)
	}
	return p.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: p.hbuf.Bytes(), EndHeaders: endHeaders})
}

// read starts a reader that reports the frames that matter, and answers
// the server's PINGs and SETTINGS as a live peer does (ack writes go
// through the same buffered writer, so only use it where the test
// goroutine does not write at the same time, or pass answer=false).
func (p *rawPeer) read(answer bool, wmu *sync.Mutex) {
	p.events = make(chan peerEvent, 1<<16)
	go func() {
		for {
			f, err := p.fr.ReadFrame()
			if err != nil {
				p.events <- peerEvent{kind: "eof", err: err}
				close(p.events)
				return
			}
			switch f := f.(type) {
			case *http2.GoAwayFrame:
				p.events <- peerEvent{kind: "goaway", stream: f.LastStreamID, code: f.ErrCode}
			case *http2.RSTStreamFrame:
				p.events <- peerEvent{kind: "rst", stream: f.StreamID, code: f.ErrCode}
			case *http2.MetaHeadersFrame:
				p.events <- peerEvent{kind: "headers", stream: f.StreamID, status: f.PseudoValue("status")}
			case *http2.PingFrame:
				if !f.IsAck() {
					p.events <- peerEvent{kind: "ping"}
					if answer {
						wmu.Lock()
						p.fr.WritePing(true, f.Data)
						p.flush()
						wmu.Unlock()
					}
				}
			case *http2.SettingsFrame:
				if !f.IsAck() && answer {
					wmu.Lock()
					p.fr.WriteSettingsAck()
					p.flush()
					wmu.Unlock()
				}
			}
		}
	}()
}

// await returns the first event of kind within d, failing the test if
// the connection ends or d passes first.
func (p *rawPeer) await(kind string, d time.Duration) peerEvent {
	p.t.Helper()
	timeout := time.After(d)
	for {
		select {
		case ev, ok := <-p.events:
			if !ok {
				p.t.Fatalf("connection ended before a %s", kind)
			}
			if ev.kind == kind {
				return ev
			}
			if ev.kind == "eof" && kind != "eof" {
				p.t.Fatalf("connection ended (%v) before a %s", ev.err, kind)
			}
		case <-timeout:
			p.t.Fatalf("no %s from the server within %v", kind, d)
		}
	}
}

// awaitStream returns the first HEADERS or RST_STREAM the server sent on
// stream id.
func (p *rawPeer) awaitStream(id uint32, d time.Duration) peerEvent {
	p.t.Helper()
	timeout := time.After(d)
	for {
		select {
		case ev, ok := <-p.events:
			if !ok || ev.kind == "eof" {
				p.t.Fatalf("connection ended before an answer on stream %d", id)
			}
			if (ev.kind == "headers" || ev.kind == "rst") && ev.stream == id {
				return ev
			}
		case <-timeout:
			p.t.Fatalf("no answer on stream %d within %v", id, d)
		}
	}
}

// blockingHandler counts its calls and holds each stream until its
// context ends (what a dial to an app that never answers does), counting
// the contexts that ended.
type blockingHandler struct {
	calls, cancelled, running atomic.Int32
}

func (h *blockingHandler) ServeHBONE(ctx context.Context, r *ServerRequest) {
	h.calls.Add(1)
	h.running.Add(1)
	defer h.running.Add(-1)
	<-ctx.Done()
	h.cancelled.Add(1)
}

// Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, as fast as the
// peer can write. The server answers GOAWAY ENHANCE_YOUR_CALM once the
// reset budget is spent; handlers for reset streams are cancelled (no dial
// goes on), and never more run than the stream limit.
func TestRapidResetGetsGoAway(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	h := &blockingHandler{}
	srv := startServer(t, m, serverID, h, Config{})
	p := dialRaw(t, ca, srv.addr)
	p.read(false, nil)
	const pairs = 40000
	sent := 0
	var werr error
	for i := 0; i < pairs && werr == nil; i++ {
		id := uint32(2*i + 1)
		if werr = p.connect(id, "127.0.0.1:9", true); werr == nil {
			werr = p.fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
		if i%256 == 255 {
			werr = errors.Join(werr, p.flush())
		}
		sent++
	}
	p.flush()
	ev := p.await("goaway", 20*time.Second)
	if ev.code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY code %v, want ENHANCE_YOUR_CALM", ev.code)
	}
	p.await("eof", 20*time.Second)
	testutil.WaitFor(t, "every handler of a reset stream ends", func() bool { return h.running.Load() == 0 })
	calls := h.calls.Load()
	// The budget (200) and the handlers that started before their RST was
	// read: far fewer than the streams sent.
	if max := int32(DefaultResetBurst + DefaultServerStreams); calls > max {
		t.Errorf("%d handlers ran for %d reset streams, want at most %d", calls, sent, max)
	}
	if c := h.cancelled.Load(); c != calls {
		t.Errorf("%d of %d handlers saw their context end", c, calls)
	}
	t.Logf("%d pairs written before the server closed; %d handlers ran", sent, calls)
	srv.log.waitLog(t, "streams reset or refused early")
}

// A stream reset while its handler works cancels the handler's context,
// and the slot it held is free once the handler returns.
func TestResetCancelsTheHandler(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	h := &blockingHandler{}
	srv := startServer(t, m, serverID, h, Config{MaxStreams: 1})
	p := dialRaw(t, ca, srv.addr)
	p.read(false, nil)
	p.connect(1, "127.0.0.1:9", true)
	p.flush()
	testutil.WaitFor(t, "the handler starts", func() bool { return h.running.Load() == 1 })
	p.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	p.flush()
	testutil.WaitFor(t, "the handler's context ends", func() bool { return h.cancelled.Load() == 1 })
	testutil.WaitFor(t, "the handler returns", func() bool { return h.running.Load() == 0 })
	// The one slot is free again: a new stream reaches a handler.
	p.connect(3, "127.0.0.1:9", true)
	p.flush()
	testutil.WaitFor(t, "a second stream's handler starts", func() bool { return h.calls.Load() == 2 })
}

// A reset stream keeps its slot while its handler runs: with MaxStreams 1,
// a stream opened then is refused, though the peer sees none open.
func TestResetStreamHoldsItsSlotUntilTheHandlerReturns(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	release := make(chan struct{})
	var calls atomic.Int32
	srv := startServer(t, m, serverID, HandlerFunc(func(ctx context.Context, r *ServerRequest) {
		calls.Add(1)
		<-release // ignores ctx: a handler slow to notice
	}), Config{MaxStreams: 1})
	defer close(release)
	p := dialRaw(t, ca, srv.addr)
	p.read(false, nil)
	p.connect(1, "127.0.0.1:9", true)
	p.flush()
	testutil.WaitFor(t, "the handler starts", func() bool { return calls.Load() == 1 })
	p.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	p.connect(3, "127.0.0.1:9", true)
	p.flush()
	if ev := p.awaitStream(3, 10*time.Second); ev.kind != "rst" || ev.code != http2.ErrCodeRefusedStream {
		t.Errorf("stream 3 while stream 1's handler runs: %+v, want RST_STREAM REFUSED_STREAM", ev)
	}
}

// A peer that sends PINGs and never reads the answers loses its
// connection once MaxControlFrames answers are queued; the heap does not
// grow with the flood.
func TestPingFloodWithoutReadingEndsTheConnection(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	p := dialRaw(t, ca, srv.addr)
	deadline := time.Now().Add(30 * time.Second)
	var werr error
	n := 0
	for ; n < 5_000_000 && werr == nil && time.Now().Before(deadline); n++ {
		werr = p.fr.WritePing(false, [8]byte{byte(n), byte(n >> 8)})
		if n%1024 == 1023 {
			werr = p.flush()
		}
	}
	if werr == nil {
		werr = p.flush()
	}
	if werr == nil {
		t.Fatalf("%d PINGs written and never read, and the connection is still open", n)
	}
	t.Logf("the server closed after %d PINGs: %v", n, werr)
	srv.log.waitLog(t, "the peer does not read")
	// The server still serves others.
	d := newDialer(t, m, Config{})
	st, err := d.Dial(ctxT(t), request(srv.addr, echoServer(t)))
	if err != nil {
		t.Fatalf("a fresh connection after the flood: %v", err)
	}
	st.Close()
}

// A header list over the advertised 64 KiB is answered 431, and the
// connection goes on: a normal CONNECT after it is served.
func TestOversizedHeadersAnswered431(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	echo := echoServer(t)
	p := dialRaw(t, ca, srv.addr)
	var wmu sync.Mutex
	p.read(true, &wmu)
	wmu.Lock()
	var pad []hpack.HeaderField
	for i := range 100 {
		pad = append(pad, hpack.HeaderField{Name: fmt.Sprintf("x-pad-%d", i), Value: strings.Repeat("a", 1024), Sensitive: true})
	}
	p.connect(1, echo.String(), true, pad...)
	p.flush()
	wmu.Unlock()
	if ev := p.awaitStream(1, 10*time.Second); ev.kind != "headers" || ev.status != "431" {
		t.Fatalf("~100 KiB of headers: %+v, want :status 431", ev)
	}
	wmu.Lock()
	p.connect(3, echo.String(), true)
	p.flush()
	wmu.Unlock()
	if ev := p.awaitStream(3, 10*time.Second); ev.kind != "headers" || ev.status != "200" {
		t.Fatalf("a normal CONNECT after the 431: %+v, want 200", ev)
	}
	// Each oversized list takes oversizedCost from the reset budget: a
	// peer that keeps sending them is cut off after burst/cost.
	wmu.Lock()
	for id := uint32(5); id < 5+2*(DefaultResetBurst/oversizedCost+5); id += 2 {
		p.connect(id, echo.String(), true, pad...)
	}
	p.flush()
	wmu.Unlock()
	if ev := p.await("goaway", 10*time.Second); ev.code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY code %v after a run of oversized header lists, want ENHANCE_YOUR_CALM", ev.code)
	}
}

// A header block of empty CONTINUATION frames without end is cut off
// after maxContinuations frames (CVE-2024-27316): GOAWAY, then close.
func TestContinuationFloodIsCutOff(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	p := dialRaw(t, ca, srv.addr)
	p.read(false, nil)
	p.connect(1, "127.0.0.1:9", false)
	var werr error
	n := 0
	deadline := time.Now().Add(20 * time.Second)
	for ; n < 5_000_000 && werr == nil && time.Now().Before(deadline); n++ {
		werr = p.fr.WriteContinuation(1, false, nil)
		if n%1024 == 1023 {
			werr = p.flush()
		}
	}
	p.flush()
	ev := p.await("goaway", 20*time.Second)
	if ev.code != http2.ErrCodeEnhanceYourCalm {
		t.Errorf("GOAWAY code %v, want ENHANCE_YOUR_CALM", ev.code)
	}
	p.await("eof", 20*time.Second)
	t.Logf("%d CONTINUATION frames written before the server closed (write error: %v)", n, werr)
	srv.log.waitLog(t, "CONTINUATION frames")
}

// A server connection that carries no stream is closed after
// ServerIdleTimeout with GOAWAY NO_ERROR, from the start and after its
// last stream; PINGs answered do not keep it.
func TestServerClosesIdleConnections(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	cfg := Config{ServerIdleTimeout: 300 * time.Millisecond, PingInterval: 100 * time.Millisecond, PingTimeout: 5 * time.Second}
	srv := startServer(t, m, serverID, relayHandler(), cfg)
	echo := echoServer(t)
	for _, withStream := range []bool{false, true} {
		p := dialRaw(t, ca, srv.addr)
		var wmu sync.Mutex
		p.read(true, &wmu)
		if withStream {
			wmu.Lock()
			p.connect(1, echo.String(), true)
			p.flush()
			wmu.Unlock()
			if ev := p.awaitStream(1, 10*time.Second); ev.status != "200" {
				t.Fatalf("CONNECT: %+v", ev)
			}
			wmu.Lock()
			p.fr.WriteData(1, true, nil) // ends our side; the echo ends its own
			p.flush()
			wmu.Unlock()
		}
		start := time.Now()
		ev := p.await("goaway", 20*time.Second)
		if ev.code != http2.ErrCodeNo {
			t.Errorf("idle GOAWAY code %v, want NO_ERROR", ev.code)
		}
		if d := time.Since(start); d < cfg.ServerIdleTimeout/2 {
			t.Errorf("GOAWAY after %v, before the idle timeout %v", d, cfg.ServerIdleTimeout)
		}
		p.await("eof", 20*time.Second)
	}
}

// A peer that answers nothing (not even PINGs) is closed after
// PingTimeout, by the server's own keepalive.
func TestServerKeepaliveClosesSilentPeers(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	cfg := Config{PingInterval: 100 * time.Millisecond, PingTimeout: 500 * time.Millisecond}
	srv := startServer(t, m, serverID, &blockingHandler{}, cfg)
	p := dialRaw(t, ca, srv.addr)
	p.connect(1, "127.0.0.1:9", true) // a stream open: the idle timer is not what closes it
	p.flush()
	// Read everything (but answer nothing) until the server closes.
	_ = p.tc.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.Copy(io.Discard, p.tc)
	if err != nil {
		t.Fatalf("the server did not close a silent peer: %v", err)
	}
	srv.log.waitLog(t, "keepalive")
}

// MaxPeerStreams counts one identity's streams across its connections:
// the stream beyond it is refused, on any of them.
func TestPeerStreamLimitAcrossConnections(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	h := &blockingHandler{}
	srv := startServer(t, m, serverID, h, Config{MaxPeerStreams: 3})
	a, b := dialRaw(t, ca, srv.addr), dialRaw(t, ca, srv.addr)
	a.read(false, nil)
	b.read(false, nil)
	a.connect(1, "127.0.0.1:9", true)
	a.connect(3, "127.0.0.1:9", true)
	a.flush()
	b.connect(1, "127.0.0.1:9", true)
	b.flush()
	testutil.WaitFor(t, "three handlers run", func() bool { return h.running.Load() == 3 })
	b.connect(3, "127.0.0.1:9", true)
	b.flush()
	if ev := b.awaitStream(3, 10*time.Second); ev.kind != "rst" || ev.code != http2.ErrCodeRefusedStream {
		t.Fatalf("a fourth stream of the same peer: %+v, want REFUSED_STREAM", ev)
	}
	// One ends: the next is admitted.
	a.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	a.flush()
	testutil.WaitFor(t, "the reset stream's handler returns", func() bool { return h.running.Load() == 2 })
	b.connect(5, "127.0.0.1:9", true)
	b.flush()
	testutil.WaitFor(t, "a stream is admitted again", func() bool { return h.running.Load() == 3 })
}

// RST_STREAM on a stream never opened is a connection error (RFC 9113
// 6.4).
func TestResetOfAnIdleStreamIsAProtocolError(t *testing.T) {
	ca := newCA(t)
	m := newManager(t, ca, 0)
	srv := startServer(t, m, serverID, relayHandler(), Config{})
	p := dialRaw(t, ca, srv.addr)
	p.read(false, nil)
	p.fr.WriteRSTStream(7, http2.ErrCodeCancel)
	p.flush()
	if ev := p.await("goaway", 10*time.Second); ev.code != http2.ErrCodeProtocol {
		t.Errorf("GOAWAY code %v, want PROTOCOL_ERROR", ev.code)
	}
}

// The guard under the read framer follows frame boundaries however the
// bytes are split into reads.
func TestFrameGuardCountsContinuationsAcrossReads(t *testing.T) {
	build := func(conts int) []byte {
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		fr.WriteData(1, false, bytes.Repeat([]byte("x"), 40000))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: []byte{0x82}})
		for range conts {
			fr.WriteContinuation(3, false, []byte{0x84})
		}
		fr.WritePing(false, [8]byte{})
		return buf.Bytes()
	}
	for _, conts := range []int{maxContinuations, maxContinuations + 1} {
		data := build(conts)
		for round := range 50 {
			g := &frameGuard{r: &chunkReader{data: data, rnd: rand.New(rand.NewPCG(uint64(round), 1))}}
			_, err := io.Copy(io.Discard, g)
			if want := conts > maxContinuations; errors.Is(err, errTooManyContinuations) != want {
				t.Fatalf("%d CONTINUATION frames, round %d: err %v, want a violation: %v", conts, round, err, want)
			}
		}
	}
}

// chunkReader returns data in random small pieces.
type chunkReader struct {
	data []byte
	rnd  *rand.Rand
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), len(r.data), 1+r.rnd.IntN(20))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

func TestResetBucket(t *testing.T) {
	b := newResetBucket(Config{ResetBurst: 3, ResetRate: 2})
	now := time.Unix(1000, 0)
	for i := range 3 {
		if !b.take(now, 1) {
			t.Fatalf("token %d of a burst of 3 refused", i)
		}
	}
	if b.take(now, 1) {
		t.Fatal("a fourth token at once was granted")
	}
	if !b.take(now.Add(600*time.Millisecond), 1) { // 1.2 tokens back at 2/s
		t.Fatal("no token 600 ms later at 2 per second")
	}
	if b.take(now.Add(700*time.Millisecond), 1) {
		t.Fatal("a second token 100 ms after the first refill")
	}
	later, got := now.Add(time.Hour), 0
	for b.take(later, 1) {
		got++
	}
	if got != 3 {
		t.Fatalf("an hour later the bucket held %d tokens, want its burst of 3", got)
	}
	// Several at once (an oversized header list's cost): all or none.
	b = newResetBucket(Config{ResetBurst: 3, ResetRate: 2})
	if b.take(now, 4) || !b.take(now, 3) || b.take(now, 1) {
		t.Fatal("taking 4 of 3 tokens, then 3, then 1 more: want no, yes, no")
	}
}

// FuzzFrameGuard: whatever the bytes and however they are split into
// reads, the guard passes every byte through unchanged and reports a
// violation exactly when a whole-buffer walk of the frames finds more than
// maxContinuations CONTINUATION frames in a row.
func FuzzFrameGuard(f *testing.F) {
	var buf bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0x82}})
	for range maxContinuations + 1 {
		fr.WriteContinuation(1, false, nil)
	}
	f.Add(buf.Bytes(), uint64(1))
	f.Add([]byte{0, 0, 0, 9, 0, 0, 0, 0, 1}, uint64(7))
	f.Fuzz(func(t *testing.T, data []byte, seed uint64) {
		// The reference: walk whole frames.
		want, run := false, 0
		for rest := data; len(rest) >= 9; {
			n := int(rest[0])<<16 | int(rest[1])<<8 | int(rest[2])
			if rest[3] == byte(http2.FrameContinuation) {
				if run++; run > maxContinuations {
					want = true
				}
			} else {
				run = 0
			}
			if 9+n > len(rest) {
				break
			}
			rest = rest[9+n:]
		}
		g := &frameGuard{r: &chunkReader{data: data, rnd: rand.New(rand.NewPCG(seed, 2))}}
		var out bytes.Buffer
		_, err := io.Copy(&out, g)
		if got := errors.Is(err, errTooManyContinuations); got != want {
			t.Fatalf("violation reported %v, want %v (err %v)", got, want, err)
		}
		if !want && !bytes.Equal(out.Bytes(), data) {
			t.Fatal("the guard changed the bytes")
		}
		if want && !bytes.HasPrefix(data, out.Bytes()) {
			t.Fatal("the guard passed bytes that were not read")
		}
	})
}
