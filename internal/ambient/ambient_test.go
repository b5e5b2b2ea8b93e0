package ambient

import "testing"

func TestNodeProxyID(t *testing.T) {
	if got := NodeProxyID().String(); got != "spiffe://cluster.local/ns/istio-system/sa/ztunnel" {
		t.Fatalf("NodeProxyID() = %s", got)
	}
}

func TestZtunnelNodeID(t *testing.T) {
	// The form istiod's ParseServiceNodeWithMetadata splits on "~".
	if got := ZtunnelNodeID("10.244.1.5", "ztunnel-x7k2p", "istio-system"); got != "ztunnel~10.244.1.5~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local" {
		t.Fatalf("ZtunnelNodeID = %s", got)
	}
}
