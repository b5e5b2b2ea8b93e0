package proxy

import (
	"testing"
	"unsafe"
)

// A node proxy holds one of these per relayed connection for the
// connection's life; a field more can move each into the next size class.
func TestConnectionRecordsFitTheirSizeClasses(t *testing.T) {
	if n := unsafe.Sizeof(liveConn{}); n > 320 {
		t.Errorf("liveConn is %d bytes, above the 320-byte size class", n)
	}
	if n := unsafe.Sizeof(outConn{}); n > 288 {
		t.Errorf("outConn is %d bytes, above the 288-byte size class", n)
	}
}
