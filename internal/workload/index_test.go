package workload

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/ambitmesh/ambit/internal/authz"
)

func wl(uid, ip string, mod ...func(*Workload)) *Workload {
	w := &Workload{UID: uid, Name: uid, Namespace: "default", ServiceAccount: "default", TrustDomain: "cluster.local",
		IPs: []netip.Addr{netip.MustParseAddr(ip)}, Protocol: ProtocolHBONE, Status: Healthy, Capacity: 1}
	for _, m := range mod {
		m(w)
	}
	return w
}

var echoKey = NamespacedHost{"default", "echo.default.svc.cluster.local"}

func echoSvc() *Service {
	return &Service{Name: "echo", Namespace: "default", Hostname: echoKey.Hostname,
		VIPs: []NetworkAddr{{"", netip.MustParseAddr("10.96.0.10")}}, Ports: map[uint16]uint16{80: 8080, 90: 0}}
}

func behind(ports map[uint16]uint16) func(*Workload) {
	return func(w *Workload) { w.Services = map[NamespacedHost]map[uint16]uint16{echoKey: ports} }
}

func TestIndexLookups(t *testing.T) {
	a := wl("a", "10.244.0.2", func(w *Workload) { w.Node = "master" })
	b := wl("b", "10.244.1.3", func(w *Workload) { w.Node = "worker1"; w.AuthorizationPolicies = []string{"default/sel"} }, behind(nil))
	sel := &authz.Policy{Name: "sel", Namespace: "default", Scope: authz.ScopeWorkloadSelector}
	nsPol := &authz.Policy{Name: "ns", Namespace: "other", Scope: authz.ScopeNamespace}
	ix, err := NewIndex([]*Workload{a, b}, []*Service{echoSvc()}, []*authz.Policy{sel, nsPol})
	if err != nil {
		t.Fatal(err)
	}
	if ix.WorkloadByAddr("", netip.MustParseAddr("10.244.1.3")) != b || ix.WorkloadByAddr("net2", netip.MustParseAddr("10.244.1.3")) != nil {
		t.Error("WorkloadByAddr")
	}
	if ix.WorkloadByAddr("", netip.MustParseAddr("::ffff:10.244.0.2")) != a {
		t.Error("v4-mapped lookup")
	}
	if s := ix.ServiceByVIP("", netip.MustParseAddr("10.96.0.10")); s == nil || s.Name != "echo" {
		t.Error("ServiceByVIP")
	}
	if len(ix.ServicesByHost(echoKey.Hostname)) != 1 || ix.Service(echoKey) == nil {
		t.Error("service by host/key")
	}
	if eps := ix.Endpoints(echoKey); len(eps) != 1 || eps[0].Workload != b {
		t.Errorf("endpoints %v", eps)
	}
	if n := ix.WorkloadsOnNode("master"); len(n) != 1 || n[0] != a {
		t.Error("WorkloadsOnNode")
	}
	if ps := ix.PoliciesFor(b); len(ps) != 1 || ps[0] != sel {
		t.Errorf("PoliciesFor(b) = %v", ps)
	}
	if ps := ix.PoliciesFor(a); len(ps) != 0 {
		t.Errorf("PoliciesFor(a) = %v", ps)
	}
	if b.Identity().String() != "spiffe://cluster.local/ns/default/sa/default" {
		t.Error("identity")
	}
}

func TestIndexRefusesInconsistency(t *testing.T) {
	cases := []struct {
		name  string
		ws    []*Workload
		ss    []*Service
		ps    []*authz.Policy
		field string
		msg   string
	}{
		{"duplicate uid", []*Workload{wl("a", "10.0.0.1"), wl("a", "10.0.0.2")}, nil, nil, "uid", "used twice"},
		{"duplicate address", []*Workload{wl("a", "10.0.0.1"), wl("b", "10.0.0.1")}, nil, nil, "workloadIps", "already workload"},
		{"address is a VIP", []*Workload{wl("a", "10.96.0.10")}, []*Service{echoSvc()}, nil, "workloadIps", "VIP"},
		{"dangling service", []*Workload{wl("a", "10.0.0.1", behind(nil))}, nil, nil, "services", "no service default/echo"},
		{"dangling policy", []*Workload{wl("a", "10.0.0.1", func(w *Workload) { w.AuthorizationPolicies = []string{"default/x"} })}, nil, nil, "authorizationPolicies", "no policy default/x"},
		{"duplicate service", nil, []*Service{echoSvc(), echoSvc()}, nil, "hostname", "defined twice"},
		{"duplicate policy", nil, nil, []*authz.Policy{{Name: "p", Namespace: "n"}, {Name: "p", Namespace: "n"}}, "name", "defined twice"},
	}
	for _, tc := range cases {
		_, err := NewIndex(tc.ws, tc.ss, tc.ps)
		var ie *IndexError
		if !errors.As(err, &ie) || ie.Field != tc.field || !strings.Contains(ie.Msg, tc.msg) {
			t.Errorf("%s: %v; want field %s, message ~%q", tc.name, err, tc.field, tc.msg)
		}
	}
}

func TestPick(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	healthy := wl("h", "10.0.0.1", behind(nil))
	sick := wl("s", "10.0.0.2", behind(nil), func(w *Workload) { w.Status = Unhealthy })
	mapped := wl("m", "10.0.0.3", behind(map[uint16]uint16{90: 9090}))
	ix, err := NewIndex([]*Workload{healthy, sick, mapped}, []*Service{echoSvc()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	svc := ix.Service(echoKey)
	seen := map[string]int{}
	for i := 0; i < 200; i++ {
		w, port, err := ix.Pick(svc, 80, nil, rnd)
		if err != nil {
			t.Fatal(err)
		}
		if port != 8080 {
			t.Fatalf("target port %d, want 8080", port)
		}
		seen[w.UID]++
	}
	if seen["s"] != 0 || seen["h"] == 0 || seen["m"] == 0 {
		t.Errorf("picks %v: want only healthy endpoints, both of them", seen)
	}
	// Port 90 maps to 0 in the service: only the endpoint that maps it qualifies.
	for i := 0; i < 20; i++ {
		w, port, err := ix.Pick(svc, 90, nil, rnd)
		if err != nil || w != mapped || port != 9090 {
			t.Fatalf("pick port 90 = %v %d %v", w, port, err)
		}
	}
	var ne *ErrNoEndpoint
	if _, _, err := ix.Pick(svc, 81, nil, rnd); !errors.As(err, &ne) || !strings.Contains(err.Error(), "no such port") {
		t.Errorf("unknown port: %v", err)
	}
	empty, _ := NewIndex(nil, []*Service{echoSvc()}, nil)
	if _, _, err := empty.Pick(empty.Service(echoKey), 80, nil, rnd); !errors.As(err, &ne) || !strings.Contains(err.Error(), "no endpoints") {
		t.Errorf("no endpoints: %v", err)
	}
}

func TestPickCapacityAndLocality(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	near := wl("near", "10.0.0.1", behind(nil), func(w *Workload) { w.Locality.Zone = "a" })
	far := wl("far", "10.0.0.2", behind(nil), func(w *Workload) { w.Locality.Zone = "b"; w.Capacity = 3 })
	src := wl("src", "10.0.0.9", func(w *Workload) { w.Locality.Zone = "a" })
	svc := echoSvc()
	ix, _ := NewIndex([]*Workload{near, far, src}, []*Service{svc}, nil)
	count := map[string]int{}
	for i := 0; i < 4000; i++ {
		w, _, _ := ix.Pick(svc, 80, src, rnd)
		count[w.UID]++
	}
	// Capacity 1 vs 3: about a quarter each way.
	if r := float64(count["near"]) / 4000; r < 0.2 || r > 0.3 {
		t.Errorf("near picked %.2f of the time, want about 0.25 (capacity 1 of 4)", r)
	}
	svc.LoadBalancer = &LoadBalancer{RoutingPreferences: []Scope{ScopeZone}, Mode: LBFailover}
	for i := 0; i < 50; i++ {
		if w, _, _ := ix.Pick(svc, 80, src, rnd); w != near {
			t.Fatal("failover picked the other zone while the same zone has an endpoint")
		}
	}
	near.Status = Unhealthy
	if w, _, err := ix.Pick(svc, 80, src, rnd); err != nil || w != far {
		t.Fatalf("failover with the zone down: %v %v", w, err)
	}
	svc.LoadBalancer.Mode = LBStrict
	if _, _, err := ix.Pick(svc, 80, src, rnd); err == nil {
		t.Fatal("strict mode picked an endpoint in another zone")
	}
}

func TestParseAddrs(t *testing.T) {
	if a, err := ParseNetworkAddr("/10.96.0.10"); err != nil || a.Network != "" || a.IP.String() != "10.96.0.10" {
		t.Errorf("%v %v", a, err)
	}
	if a, err := ParseNetworkAddr("net1/2001:db8::1"); err != nil || a.Network != "net1" {
		t.Errorf("%v %v", a, err)
	}
	for _, bad := range []string{"10.96.0.10", "/10.96.0.300", "/", "/fe80::1%eth0"} {
		if _, err := ParseNetworkAddr(bad); err == nil {
			t.Errorf("ParseNetworkAddr(%q) accepted", bad)
		}
	}
	if h, err := ParseNamespacedHost("default/echo.default.svc.cluster.local"); err != nil || h != echoKey {
		t.Errorf("%v %v", h, err)
	}
	for _, bad := range []string{"echo", "/echo", "default/", "a/b/c"} {
		if _, err := ParseNamespacedHost(bad); err == nil {
			t.Errorf("ParseNamespacedHost(%q) accepted", bad)
		}
	}
}

func TestAllowDangling(t *testing.T) {
	w := wl("a", "10.0.0.1", behind(nil), func(w *Workload) { w.AuthorizationPolicies = []string{"default/later"} })
	if _, err := NewIndex([]*Workload{w}, nil, nil); err == nil {
		t.Fatal("strict index accepted dangling references")
	}
	ix, err := NewIndex([]*Workload{w}, nil, nil, AllowDangling())
	if err != nil {
		t.Fatal(err)
	}
	if len(ix.PoliciesFor(w)) != 0 || len(ix.Endpoints(echoKey)) != 0 {
		t.Error("a missing policy or service must apply to nothing")
	}
	// Duplicates stay errors.
	if _, err := NewIndex([]*Workload{w, wl("a", "10.0.0.2")}, nil, nil, AllowDangling()); err == nil {
		t.Error("duplicate uid accepted")
	}
}
