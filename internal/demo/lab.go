package demo

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/lab"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/trace"
	"github.com/vishvananda/netns"
)

// LabOptions tune the seed's demo.
type LabOptions struct {
	Self   string // the ambit binary (the lab runs it inside namespaces)
	Name   string // lab name; default "seed"
	OutDir string // where the pcap files go; default ./demo-out
	Keep   bool   // leave the lab up to explore
	// Geteuid reports the effective user; nil means os.Geteuid. Tests set it.
	Geteuid func() int
}

// hop is one place the demo watches.
type hop struct {
	title string
	ns    string // namespace name
	iface string
	file  string
}

// RunLab is `make demo`: the seed's request for real, in the lab, shown hop
// by hop. It needs root (namespaces, nftables).
func RunLab(w io.Writer, o LabOptions) error {
	euid := os.Geteuid
	if o.Geteuid != nil {
		euid = o.Geteuid
	}
	if euid() != 0 {
		return errors.New("the demo builds network namespaces and nftables rules, which needs root: run it as root (e.g. sudo make demo)")
	}
	if o.Name == "" {
		o.Name = "seed"
	}
	if o.OutDir == "" {
		o.OutDir = "demo-out"
	}
	topo, err := lab.ParseTopology("default seed topology", lab.DefaultTopology)
	if err != nil {
		return err
	}
	topo.Name = o.Name
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("Ambit demo: the seed's request, `curl http://10.244.1.3` from the client pod, through the mesh.\n")
	p("== bringing the lab up (two nodes, node agents and proxies, both pods in the mesh)")
	if err := lab.UpAll(topo, lab.DefaultTopology, o.Self, w, lab.UpOptions{ProxyLogLevel: "debug"}); err != nil {
		return err
	}
	if !o.Keep {
		defer lab.Down(topo.Name)
	}
	hops := []hop{
		{"1. client pod, lo: the app's plain connection, captured by nftables to the proxy's 15001", topo.PodNamespace("client"), "lo", "1-client-pod-lo.pcap"},
		{"2. client pod, eth0: the client node's proxy tunnels it, HBONE from the pod's own IP to 15008", topo.PodNamespace("client"), "eth0", "2-client-pod-eth0.pcap"},
		{"3. the wire between the nodes (master's port on it)", "ambit-" + topo.Name + "-wire", "n0", "3-wire.pcap"},
		{"4. server pod, eth0: HBONE arrives at the server node's proxy (15008, never redirected)", topo.PodNamespace("server"), "eth0", "4-server-pod-eth0.pcap"},
		{"5. server pod, lo: the proxy delivers to the app from the client's IP", topo.PodNamespace("server"), "lo", "5-server-pod-lo.pcap"},
	}
	var caps []*trace.Capture
	for _, h := range hops {
		ns, err := netns.GetFromName(h.ns)
		if err != nil {
			return err
		}
		c, err := trace.Start(ns, h.iface)
		ns.Close()
		if err != nil {
			return err
		}
		caps = append(caps, c)
	}
	mark := map[string]int{}
	for _, n := range []string{"master", "worker1"} {
		mark[n] = len(readFile(filepath.Join(lab.StateDir(topo.Name), "proxy-"+n+".log")))
	}

	p("\n== the request")
	start := time.Now()
	status, body, err := request(topo.PodNamespace("client"), "10.244.1.3")
	time.Sleep(300 * time.Millisecond) // let the last FIN/ACKs land
	var packets [][]trace.Packet
	for _, c := range caps {
		packets = append(packets, trace.TCP(c.Stop()))
	}
	if err != nil {
		return fmt.Errorf("the request failed: %w", err)
	}
	p("client pod:  GET / HTTP/1.1  Host: 10.244.1.3")
	p("answer:      %s", status)
	p("body:        %s", strings.TrimSpace(body))

	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return err
	}
	var problems []string
	for i, h := range hops {
		p("\n== %s  (netns %s, %s)", h.title, h.ns, h.iface)
		pk := packets[i]
		for j, x := range pk {
			if j == 14 && len(pk) > 16 {
				p("  ... %d more packets (all in the pcap)", len(pk)-14)
				break
			}
			p("  %s", trace.Describe(x, start))
		}
		if len(pk) == 0 {
			p("  (no packets)")
			problems = append(problems, "no packets at hop "+h.iface+" of "+h.ns)
		}
		path := filepath.Join(o.OutDir, h.file)
		if err := trace.WritePCAP(path, pk); err != nil {
			return err
		}
		p("  -> %s (%d packets; open it in Wireshark)", path, len(pk))
		if i >= 1 && i <= 3 {
			for _, x := range pk {
				if trace.PlaintextHTTP(x) {
					problems = append(problems, "plaintext HTTP seen at hop "+fmt.Sprint(i+1))
					break
				}
			}
		}
	}

	for _, n := range []struct{ node, role string }{{"master", "client node's proxy"}, {"worker1", "server node's proxy"}} {
		p("\n== the %s (%s) said", n.role, n.node)
		lines := readFile(filepath.Join(lab.StateDir(topo.Name), "proxy-"+n.node+".log"))
		for _, l := range lines[min(mark[n.node], len(lines)):] {
			if strings.Contains(l, "msg=\"outbound") || strings.Contains(l, "msg=\"inbound") || strings.Contains(l, "connection complete") {
				p("  %s", trimTime(l))
			}
		}
	}
	if !strings.Contains(status, "200") || !strings.Contains(body, "you are 10.244.0.2:") {
		problems = append(problems, "the server did not see the client pod's IP")
	}
	p("")
	if len(problems) > 0 {
		return fmt.Errorf("the demo found problems: %s", strings.Join(problems, "; "))
	}
	p("ok: the app's plain request was captured in the client pod, crossed the wire only as TLS to 15008, and reached the server from 10.244.0.2.")
	if o.Keep {
		p("\nThe lab is still up. Explore it:\n  ambit lab status\n  ambit lab exec client -- curl -s http://10.244.1.3/\n  ambit lab exec node/master -- ip route\n  logs: %s\nTake it down with: ambit lab down", lab.StateDir(topo.Name))
	} else {
		p("The lab is taken down (run `ambit demo --keep` to explore it).")
	}
	return nil
}

// request sends the seed's request from inside the pod and returns the
// status line and body.
func request(podNS, host string) (status, body string, err error) {
	h, err := netns.GetFromName(podNS)
	if err != nil {
		return "", "", err
	}
	defer h.Close()
	err = nsutil.Do(h, func() error {
		c, err := net.DialTimeout("tcp", host+":80", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: curl/7.85.0\r\nAccept: */*\r\nConnection: close\r\n\r\n", host)
		all, err := io.ReadAll(bufio.NewReader(c))
		if err != nil {
			return err
		}
		head, rest, _ := strings.Cut(string(all), "\r\n\r\n")
		status, _, _ = strings.Cut(head, "\r\n")
		body = rest
		return nil
	})
	return status, body, err
}

func readFile(path string) []string {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\n"), "\n")
}

// trimTime drops the timestamp and level of a text log line.
func trimTime(l string) string {
	if i := strings.Index(l, "msg="); i >= 0 {
		return l[i:]
	}
	return l
}
