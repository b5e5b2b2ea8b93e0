package demo

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/capture"
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
	ns    string // the network namespace, as shown: a name, or a path
	iface string
	file  string
	path  string // the namespace's file when ns is not a name in /run/netns
}

func (h hop) nsPath() string {
	if h.path != "" {
		return h.path
	}
	return filepath.Join("/run/netns", h.ns)
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
	if err := capture.Check(); err != nil {
		return fmt.Errorf("the demo needs in-pod capture: %w", err)
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
	status, body, problems, err := Trace(w, topo, "client", netip.MustParseAddrPort("10.244.1.3:80"), o.OutDir)
	if err != nil {
		return err
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

// Trace sends an HTTP GET from a pod of a running lab to dst (a pod's IP or
// a service VIP) and shows it hop by hop: packets at the source pod's
// loopback and eth0, on the source node's port of the wire, at the
// destination pod's eth0 and loopback, a pcap per hop in outDir, and what
// both proxies said. It returns the answer's status line and body, and the
// problems it saw (plaintext between pods, an empty hop).
func Trace(w io.Writer, topo *lab.Topology, from string, dst netip.AddrPort, outDir string) (status, body string, problems []string, err error) {
	src := topo.Pod(from)
	if src == nil {
		return "", "", nil, fmt.Errorf("trace: no pod %q in lab %q", from, topo.Name)
	}
	to := topo.PodAt(dst.Addr())
	if to == nil {
		return "", "", nil, fmt.Errorf("trace: %s is neither a pod nor a service VIP with a pod behind it in lab %q", dst.Addr(), topo.Name)
	}
	wirePort := fmt.Sprintf("n%d", topo.NodeIndex(src.Node))
	hops := []hop{
		{fmt.Sprintf("1. %s pod, lo: the app's plain connection, captured to the proxy's 15001", src.Name), topo.PodNamespace(src.Name), "lo", "1-" + src.Name + "-pod-lo.pcap", ""},
		{fmt.Sprintf("2. %s pod, eth0: %s's proxy tunnels it, HBONE from the pod's own IP", src.Name, src.Node), topo.PodNamespace(src.Name), "eth0", "2-" + src.Name + "-pod-eth0.pcap", ""},
		{fmt.Sprintf("3. the wire between the nodes (%s's port on it)", src.Node), "ambit-" + topo.Name + "-wire", wirePort, "3-wire.pcap", ""},
		{fmt.Sprintf("4. %s pod, eth0: HBONE arrives at %s's proxy (15008, never redirected)", to.Name, to.Node), topo.PodNamespace(to.Name), "eth0", "4-" + to.Name + "-pod-eth0.pcap", ""},
		{fmt.Sprintf("5. %s pod, lo: the proxy delivers to the app from the client's IP", to.Name), topo.PodNamespace(to.Name), "lo", "5-" + to.Name + "-pod-lo.pcap", ""},
	}
	if src.Node == to.Node {
		hops = append(hops[:2], hops[3:]...) // same node: nothing crosses the wire
	}
	mark := map[string]int{}
	nodes := []string{src.Node}
	if to.Node != src.Node {
		nodes = append(nodes, to.Node)
	}
	for _, n := range nodes {
		mark[n] = len(readFile(filepath.Join(lab.StateDir(topo.Name), "proxy-"+n+".log")))
	}
	return runTrace(w, traceSpec{
		hops: hops, from: src.Name, fromNS: filepath.Join("/run/netns", topo.PodNamespace(src.Name)), dst: dst, outDir: outDir,
		meshOnly: src.InMesh() && to.InMesh(), nodes: nodes,
		proxyLog: func(node string) []string {
			lines := readFile(filepath.Join(lab.StateDir(topo.Name), "proxy-"+node+".log"))
			return lines[min(mark[node], len(lines)):]
		},
	})
}

// traceSpec is one trace: where to watch, what to send, whose account.
type traceSpec struct {
	hops     []hop
	from     string // the source pod, as shown
	fromNS   string // its network namespace's file: the request is sent from there
	dst      netip.AddrPort
	outDir   string
	meshOnly bool     // both ends in the mesh: plain HTTP off loopback is a problem
	nodes    []string // whose proxy's account to show
	// proxyLog is what node's proxy has logged since the trace began.
	proxyLog func(node string) []string
}

// runTrace starts the captures, sends the request, and shows each hop's
// packets (writing a pcap per hop) and what the proxies said.
func runTrace(w io.Writer, t traceSpec) (status, body string, problems []string, err error) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	hops, dst, outDir := t.hops, t.dst, t.outDir
	var caps []*trace.Capture
	defer func() {
		for _, c := range caps {
			c.Stop() // the ones not stopped yet; a second Stop is a no-op
		}
	}()
	for _, h := range hops {
		ns, err := netns.GetFromPath(h.nsPath())
		if err != nil {
			return "", "", nil, fmt.Errorf("trace: %s: %w", h.ns, err)
		}
		c, err := trace.Start(ns, h.iface)
		ns.Close()
		if err != nil {
			return "", "", nil, err
		}
		caps = append(caps, c)
	}

	p("\n== the request")
	start := time.Now()
	status, body, err = request(t.fromNS, dst)
	time.Sleep(300 * time.Millisecond) // let the last FIN/ACKs land
	var packets [][]trace.Packet
	for _, c := range caps {
		packets = append(packets, trace.TCP(c.Stop()))
	}
	if err != nil {
		return "", "", nil, fmt.Errorf("the request failed: %w", err)
	}
	p("%s pod:  GET / HTTP/1.1  Host: %s", t.from, dst.Addr())
	p("answer:      %s", status)
	p("body:        %s", strings.TrimSpace(body))

	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", "", nil, err
	}
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
		path := filepath.Join(outDir, h.file)
		if err := trace.WritePCAP(path, pk); err != nil {
			return "", "", nil, err
		}
		p("  -> %s (%d packets; open it in Wireshark)", path, len(pk))
		if h.iface != "lo" && t.meshOnly { // between mesh pods only TLS may travel
			for _, x := range pk {
				if trace.PlaintextHTTP(x) {
					problems = append(problems, "plaintext HTTP seen at hop "+fmt.Sprint(i+1))
					break
				}
			}
		}
	}

	// The proxies write their logs within 100 ms (buffered): wait for each
	// one's record of this connection, for up to 2 s.
	said := map[string][]string{} // node -> its log lines since the request
	for end := time.Now().Add(2 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		logged := 0
		for _, n := range t.nodes {
			said[n] = t.proxyLog(n)
			if slices.ContainsFunc(said[n], func(l string) bool { return strings.Contains(l, "connection complete") }) {
				logged++
			}
		}
		if logged == len(t.nodes) || time.Now().After(end) {
			break
		}
	}
	for _, n := range t.nodes {
		p("\n== the proxy of node %s said", n)
		for _, l := range said[n] {
			if strings.Contains(l, "msg=\"outbound") || strings.Contains(l, "msg=\"inbound") || strings.Contains(l, "connection complete") {
				p("  %s", trimTime(l))
			}
		}
	}
	return status, body, problems, nil
}

// request sends the seed's request from inside the pod and returns the
// status line and body.
func request(podNS string, dst netip.AddrPort) (status, body string, err error) {
	h, err := netns.GetFromPath(podNS)
	if err != nil {
		return "", "", err
	}
	defer h.Close()
	err = nsutil.Do(h, func() error {
		c, err := net.DialTimeout("tcp", dst.String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: curl/7.85.0\r\nAccept: */*\r\nConnection: close\r\n\r\n", dst.Addr())
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
