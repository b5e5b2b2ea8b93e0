package ambient

import "testing"

func TestNodeProxyID(t *testing.T) {
	if got := NodeProxyID().String(); got != "spiffe://cluster.local/ns/istio-system/sa/ztunnel" {
		t.Fatalf("NodeProxyID() = %s", got)
	}
}
