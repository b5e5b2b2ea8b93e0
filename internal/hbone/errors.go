package hbone

import (
	"errors"
	"fmt"
	"net/http"

	"golang.org/x/net/http2"
)

// StatusError is a CONNECT answered with something other than 200. The
// status is the HBONE verdict: 400 bad request, 401 denied by policy, 503
// upstream unreachable or unknown destination.
type StatusError struct {
	Status int
	Reason string // from the peer's "x-ambit-reason" header, if any
}

func (e *StatusError) Error() string {
	s := fmt.Sprintf("hbone: CONNECT answered %d %s", e.Status, http.StatusText(e.Status))
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	return s
}

// StatusCode extracts the HTTP status carried by err, or 0.
func StatusCode(err error) int {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Status
	}
	return 0
}

// ResetError is a stream ended by RST_STREAM, from the peer or locally.
type ResetError struct {
	Code   http2.ErrCode
	Remote bool
}

func (e *ResetError) Error() string {
	if e.Remote {
		return "hbone: stream reset by peer: " + e.Code.String()
	}
	return "hbone: stream reset: " + e.Code.String()
}

var (
	// ErrConnClosed is returned for streams of a connection that is gone.
	ErrConnClosed = errors.New("hbone: connection closed")
	// errGoingAway marks a connection that takes no new streams; a dial retries on another.
	errGoingAway = errors.New("hbone: connection going away")
	// errKeepalive is the close reason when the peer stops answering PINGs.
	errKeepalive = errors.New("hbone: peer did not answer keepalive PING")
	// errIdle is the close reason of a pooled connection unused for the idle timeout.
	errIdle = errors.New("hbone: idle connection closed")
)

// reasonHeader carries a short human reason with a non-200 answer.
const reasonHeader = "x-ambit-reason"
