package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/lab"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/testutil"
	"github.com/google/gopacket/pcapgo"
	"github.com/vishvananda/netns"
)

// TestMain lets this test binary stand in for ambit: the lab starts node
// agents, proxies and servers by running its own executable, which here is
// the test binary; with AMBIT_TEST_AS_MAIN set it runs main instead of tests.
func TestMain(m *testing.M) {
	if os.Getenv("AMBIT_TEST_AS_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Setenv("AMBIT_TEST_AS_MAIN", "1") // for the processes the lab starts
	testutil.VerifyNoLeaks(m)            // and no goroutine may outlive the tests
}

// get sends the seed's request from inside a pod and returns the answer.
func get(t *testing.T, labName, pod, url string) (string, error) {
	t.Helper()
	h, err := netns.GetFromName("ambit-" + labName + "-pod-" + pod)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var body string
	err = nsutil.Do(h, func() error {
		host := strings.TrimPrefix(url, "http://")
		c, err := net.DialTimeout("tcp", host+":80", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: curl/7.85.0\r\nAccept: */*\r\nConnection: close\r\n\r\n", host)
		b, err := io.ReadAll(bufio.NewReader(c))
		body = string(b)
		return err
	})
	return body, err
}

func count(t *testing.T, path, sub string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), sub)
}

// The seed's request, for real: lab up builds the two nodes with their node
// agents and proxies, the client pod's plain HTTP request is captured,
// carried over HBONE and delivered from the client's IP; both proxies log
// it; unenrolling sends the next request direct; down leaves nothing.
func TestLabSeedRequestThroughTheMesh(t *testing.T) {
	testutil.NeedRoot(t)
	name := fmt.Sprintf("e%d", os.Getpid()%100000)
	t.Cleanup(func() { lab.Down(name) })
	before := testutil.HostState(t)
	out, err := run(t, "lab", "up", "--name", name)
	if err != nil {
		t.Fatalf("lab up: %v\n%s", err, out)
	}
	state := lab.StateDir(name)
	master, worker := filepath.Join(state, "proxy-master.log"), filepath.Join(state, "proxy-worker1.log")

	body, err := get(t, name, "client", "http://10.244.1.3")
	if err != nil || !strings.Contains(body, "200 OK") || !strings.Contains(body, "you are 10.244.0.2:") {
		t.Fatalf("the seed's request: %q, %v", body, err)
	}
	testutilWait(t, "both access-log records", func() bool {
		return count(t, master, "connection complete") == 1 && count(t, worker, "connection complete") == 1
	})
	for _, f := range []string{master, worker} {
		b, _ := os.ReadFile(f)
		for _, want := range []string{"src.addr=10.244.0.2:", "dst.addr=10.244.1.3:80", "dst.hbone_addr=10.244.1.3:15008",
			"src.identity=spiffe://cluster.local/ns/default/sa/default", "dst.identity=spiffe://cluster.local/ns/default/sa/default"} {
			if !strings.Contains(string(b), want) {
				t.Errorf("%s lacks %q:\n%s", filepath.Base(f), want, b)
			}
		}
	}

	if _, err := run(t, "lab", "unenroll", "client", "--name", name); err != nil {
		t.Fatal(err)
	}
	body, err = get(t, name, "client", "http://10.244.1.3")
	if err != nil || !strings.Contains(body, "you are 10.244.0.2:") {
		t.Fatalf("after unenroll: %q, %v", body, err)
	}
	testutilWait(t, "the server's plaintext record", func() bool { return count(t, worker, "connection complete") == 2 })
	time.Sleep(300 * time.Millisecond) // proxies flush their logs within 100 ms: a wrong record would be there by now
	if n := count(t, master, "connection complete"); n != 1 {
		t.Errorf("the client's proxy saw %d connections after unenroll, want still 1", n)
	}
	if _, err := run(t, "lab", "enroll", "client", "--name", name); err != nil {
		t.Fatal(err)
	}
	if body, err := get(t, name, "client", "http://10.244.1.3"); err != nil || !strings.Contains(body, "you are 10.244.0.2:") {
		t.Fatalf("after re-enroll: %q, %v", body, err)
	}
	testutilWait(t, "the re-enrolled record", func() bool { return count(t, master, "connection complete") == 2 })

	// The client node's proxy goes away: the client's connections fail at
	// once (refused, no hang); once it is back it takes its pods from the
	// agent again and connections work.
	topo, err := lab.Current(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := topo.StopProxy("master"); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if body, err := get(t, name, "client", "http://10.244.1.3"); err == nil {
		t.Fatalf("a request with the client's proxy down succeeded: %q", body)
	} else if !strings.Contains(err.Error(), "connection refused") || time.Since(began) > 3*time.Second {
		t.Errorf("with the proxy down: %v after %v; want a prompt refusal", err, time.Since(began))
	}
	self, _ := os.Executable()
	if err := topo.StartProxy("master", self); err != nil {
		t.Fatal(err)
	}
	testutilWait(t, "the restarted proxy to serve the client again", func() bool {
		body, err := get(t, name, "client", "http://10.244.1.3")
		return err == nil && strings.Contains(body, "you are 10.244.0.2:")
	})

	if _, err := run(t, "lab", "down", "--name", name); err != nil {
		t.Fatal(err)
	}
	if st, _ := lab.Status(name); len(st) != 0 {
		t.Fatalf("after down: %q", st)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state directory left: %v", err)
	}
	testutil.SameHostState(t, before, testutil.HostState(t))
}

func testutilWait(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// `make demo`: the seed's request hop by hop, with a pcap per hop.
func TestDemoShowsTheSeedHopByHop(t *testing.T) {
	testutil.NeedRoot(t)
	name := fmt.Sprintf("d%d", os.Getpid()%100000)
	t.Cleanup(func() { lab.Down(name) })
	outDir := t.TempDir()
	out, err := run(t, "demo", "--lab-name", name, "--out", outDir)
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"answer:      HTTP/1.1 200 OK", "you are 10.244.0.2:",
		"> 127.0.0.1:15001 [S]", `"GET / HTTP/1.1" (plaintext)`, "> 10.244.1.3:15008 [S]", "TLS handshake", "TLS application data (encrypted)",
		`msg="outbound dialed a new HBONE connection"`, `tls="TLS 1.3 TLS_AES_`, "status=200",
		`msg="inbound policy allows"`, `msg="inbound upstream connected" from=10.244.0.2:`,
		"direction=outbound", "direction=inbound", "ok: the app's plain request was captured",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	// Plaintext only inside the pods (hops 1 and 5), never on eth0 or the wire.
	sections := strings.Split(out, "\n== ")
	for _, s := range sections {
		if strings.HasPrefix(s, "2. ") || strings.HasPrefix(s, "3. ") || strings.HasPrefix(s, "4. ") {
			if strings.Contains(s, "(plaintext)") {
				t.Errorf("plaintext between the pods:\n%s", s)
			}
		}
	}
	for _, f := range []string{"1-client-pod-lo.pcap", "2-client-pod-eth0.pcap", "3-wire.pcap", "4-server-pod-eth0.pcap", "5-server-pod-lo.pcap"} {
		fh, err := os.Open(filepath.Join(outDir, f))
		if err != nil {
			t.Fatal(err)
		}
		r, err := pcapgo.NewReader(fh)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		n := 0
		for {
			if _, _, err := r.ReadPacketData(); err != nil {
				break
			}
			n++
		}
		fh.Close()
		if n < 5 {
			t.Errorf("%s holds %d packets", f, n)
		}
	}
	if st, _ := lab.Status(name); len(st) != 0 {
		t.Errorf("the demo left the lab up: %q", st)
	}
}

const policyLab = `nodes:
- {name: master, podCIDR: 10.244.0.0/24}
- {name: worker1, podCIDR: 10.244.1.0/24}
pods:
- {name: client, node: master, ip: 10.244.0.2, serviceAccount: client}
- {name: intruder, node: master, ip: 10.244.0.3, serviceAccount: intruder}
- {name: outsider, node: master, ip: 10.244.0.5, mesh: false}
- {name: server, node: worker1, ip: 10.244.1.3, serviceAccount: server, labels: {app: server}, serve: {protocol: http, port: 80}}
- {name: legacy, node: worker1, ip: 10.244.1.4, mesh: false, serve: {protocol: http, port: 80}}
services:
- {name: server, vip: 10.96.0.10, ports: {80: 80}, selector: {app: server}}
policies:
- name: deny-intruder
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/intruder"]
`

// Policy between pods, pods outside the mesh both ways, and a service VIP.
func TestLabPolicyNonMeshAndService(t *testing.T) {
	testutil.NeedRoot(t)
	name := fmt.Sprintf("p%d", os.Getpid()%100000)
	t.Cleanup(func() { lab.Down(name) })
	file := filepath.Join(t.TempDir(), "lab.yaml")
	os.WriteFile(file, []byte(policyLab), 0o644)
	if out, err := run(t, "lab", "up", "-f", file, "--name", name); err != nil {
		t.Fatalf("lab up: %v\n%s", err, out)
	}
	worker := filepath.Join(lab.StateDir(name), "proxy-worker1.log")
	cases := []struct {
		from, to string
		ok       bool
		seenAs   string
	}{
		{"client", "10.244.1.3", true, "10.244.0.2"},   // mesh to mesh
		{"client", "10.96.0.10", true, "10.244.0.2"},   // the service VIP
		{"outsider", "10.244.1.3", true, "10.244.0.5"}, // non-mesh to mesh: plaintext on 15006
		{"client", "10.244.1.4", true, "10.244.0.2"},   // mesh to non-mesh: plain TCP from the pod's IP
		{"intruder", "10.244.1.3", false, ""},          // denied by policy at the destination
	}
	for _, c := range cases {
		body, err := get(t, name, c.from, "http://"+c.to)
		if !c.ok {
			if err == nil && strings.Contains(body, "200 OK") {
				t.Errorf("%s -> %s: allowed, want denied", c.from, c.to)
			}
			continue
		}
		if err != nil || !strings.Contains(body, "you are "+c.seenAs+":") {
			t.Errorf("%s -> %s: %q, %v; want an answer to %s", c.from, c.to, body, err, c.seenAs)
		}
	}
	testutilWait(t, "the denial in the server node's log", func() bool {
		b, _ := os.ReadFile(worker)
		return strings.Contains(string(b), "denied: denied by DENY policy default/deny-intruder")
	})
	// The outsider's connection arrived in plaintext (no identity) and was logged.
	b, _ := os.ReadFile(worker)
	var outsider string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "connection complete") && strings.Contains(l, "src.addr=10.244.0.5:") {
			outsider = l
		}
	}
	if outsider == "" || strings.Contains(outsider, "src.identity=") || !strings.Contains(outsider, "direction=inbound") {
		t.Errorf("the outsider's record: %q", outsider)
	}

	// ambit trace shows any connection of the running lab, here through the VIP.
	traceDir := t.TempDir()
	out, err := run(t, "trace", "--name", name, "--from", "client", "--to", "10.96.0.10:80", "--out", traceDir)
	if err != nil {
		t.Fatalf("trace: %v\n%s", err, out)
	}
	// The earlier requests left a pooled HBONE connection: the trace rides it
	// (no new handshake), and the client's proxy says so.
	for _, want := range []string{"> 127.0.0.1:15001 [S]", "> 10.244.1.3:15008 [P.]", "TLS application data (encrypted)",
		`msg="outbound reused a pooled HBONE connection"`,
		"server pod, lo: the proxy delivers", "answer: HTTP/1.1 200 OK  hello from 10.244.1.3:80; you are 10.244.0.2:"} {
		if !strings.Contains(out, want) {
			t.Errorf("trace output lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(traceDir, "3-wire.pcap")); err != nil {
		t.Errorf("no pcap for the wire: %v", err)
	}
	if _, err := run(t, "trace", "--name", name, "--from", "client", "--to", "10.99.9.9:80"); err == nil {
		t.Error("trace to an address outside the lab succeeded")
	}
}
