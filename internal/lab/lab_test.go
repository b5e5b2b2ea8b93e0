package lab

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/vishvananda/netns"
)

func TestParseSeedTopology(t *testing.T) {
	topo, err := LoadTopology("../../examples/seed-lab.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if topo.Name != "seed" || len(topo.Nodes) != 2 || len(topo.Pods) != 2 {
		t.Fatalf("%+v", topo)
	}
	c, s := topo.Pod("client"), topo.Pod("server")
	if c.Addr().String() != "10.244.0.2" || s.Serve.Port != 80 || !c.InMesh() || topo.Node("master").Gateway().String() != "10.244.0.1" {
		t.Errorf("client %+v server %+v", c, s)
	}
}

func TestTopologyErrors(t *testing.T) {
	base := "nodes:\n- {name: a, podCIDR: 10.244.0.0/24}\n"
	cases := map[string]string{
		"unknown field":  base + "pods:\n- {name: p, node: a, ip: 10.244.0.2, colour: red}\n",
		"bad cidr":       "nodes:\n- {name: a, podCIDR: 10.244.0.1/24}\n",
		"overlap":        base + "- {name: b, podCIDR: 10.244.0.0/16}\n",
		"pod outside":    base + "pods:\n- {name: p, node: a, ip: 10.245.0.2}\n",
		"pod on gateway": base + "pods:\n- {name: p, node: a, ip: 10.244.0.1}\n",
		"unknown node":   base + "pods:\n- {name: p, node: b, ip: 10.244.0.2}\n",
		"duplicate ip":   base + "pods:\n- {name: p, node: a, ip: 10.244.0.2}\n- {name: q, node: a, ip: 10.244.0.2}\n",
		"bad server":     base + "pods:\n- {name: p, node: a, ip: 10.244.0.2, serve: {protocol: udp, port: 53}}\n",
		"no nodes":       "pods: []\n",
		"bad lab name":   "name: Seed_Lab\n" + base,
	}
	want := map[string]string{
		"unknown field": "t.yaml:4:38: pods[0].colour: unknown field", "bad cidr": "podCIDR", "overlap": "overlaps",
		"pod outside": "pods[0].ip", "pod on gateway": "gateway", "unknown node": `no node "b"`, "duplicate ip": "already pod p's",
		"bad server": "want http or tcp-echo", "no nodes": "at least one node", "bad lab name": "short lower-case name",
	}
	for name, doc := range cases {
		_, err := ParseTopology("t.yaml", []byte(doc))
		if err == nil || !strings.Contains(err.Error(), want[name]) {
			t.Errorf("%s: %v; want %q", name, err, want[name])
		}
	}
}

// The seed's two nodes come up, a pod on one reaches a pod on the other
// through both nodes, the host's namespace gains nothing, and Down removes
// every namespace.
func TestUpDownSeed(t *testing.T) {
	testutil.NeedRoot(t)
	topo, err := LoadTopology("../../examples/seed-lab.yaml")
	if err != nil {
		t.Fatal(err)
	}
	topo.Name = fmt.Sprintf("t%d", os.Getpid()%100000) // never touch a real "seed" lab
	// Two long names sharing a prefix: their node-side ports must not collide.
	extra := "\n- {name: frontend-canary-a, node: master, ip: 10.244.0.10}\n- {name: frontend-canary-b, node: master, ip: 10.244.0.11}\n"
	data, _ := os.ReadFile("../../examples/seed-lab.yaml")
	if topo, err = ParseTopology("seed+", append(data, extra...)); err != nil {
		t.Fatal(err)
	}
	topo.Name = fmt.Sprintf("t%d", os.Getpid()%100000)
	t.Cleanup(func() { Down(topo.Name) })
	before := testutil.HostState(t)
	if err := Up(topo); err != nil {
		t.Fatal(err)
	}
	for name := range testutil.HostState(t) {
		if !before[name] {
			t.Errorf("lab up created %q in the host's namespace", name)
		}
	}
	open := func(pod string) netns.NsHandle {
		h, err := netns.GetFromName(topo.PodNamespace(pod))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		return h
	}
	client, server := open("client"), open("server")
	var l net.Listener
	if err := nsutil.Do(server, func() (err error) { l, err = net.Listen("tcp", "10.244.1.3:80"); return }); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		got <- c.RemoteAddr().String()
		io.WriteString(c, "hello from worker1")
		c.Close()
	}()
	var reply []byte
	if err := nsutil.Do(client, func() error {
		c, err := net.DialTimeout("tcp", "10.244.1.3:80", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		reply, err = io.ReadAll(c)
		return err
	}); err != nil {
		t.Fatalf("client pod to server pod across nodes: %v", err)
	}
	if string(reply) != "hello from worker1" {
		t.Fatalf("reply %q", reply)
	}
	if peer := <-got; !strings.HasPrefix(peer, "10.244.0.2:") {
		t.Errorf("server saw %s, want the client pod's IP (routed, not NATed)", peer)
	}
	st, err := Status(topo.Name)
	if err != nil || len(st) != 7 { // wire, 2 nodes, 4 pods
		t.Fatalf("status: %v %q", err, st)
	}
	if err := Down(topo.Name); err != nil {
		t.Fatal(err)
	}
	if st, _ := Status(topo.Name); len(st) != 0 {
		t.Fatalf("after down: %q", st)
	}
	testutil.SameHostState(t, before, testutil.HostState(t))
	// Up after a crash (namespaces left behind) starts clean.
	if err := Up(topo); err != nil {
		t.Fatal(err)
	}
	if err := Up(topo); err != nil {
		t.Fatalf("second up over a live lab: %v", err)
	}
}

// The embedded default is the file shipped in examples/, byte for byte.
func TestDefaultTopologyIsTheExample(t *testing.T) {
	ex, err := os.ReadFile("../../examples/seed-lab.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if string(ex) != string(DefaultTopology) {
		t.Fatal("internal/lab/seed.yaml and examples/seed-lab.yaml differ: copy the example over")
	}
}
