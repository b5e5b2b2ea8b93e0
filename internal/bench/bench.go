// Package bench is Ambit's performance suite (`ambit bench`, `make bench`).
// It builds a lab of its own (the seed's two nodes, a client pod on one and
// a server pod on the other) and measures the same traffic three ways in one
// run: direct TCP pod to pod with the mesh off, through the mesh (capture +
// HBONE + capture), and through a TLS relay pair (the leanest encrypted
// tunnel, see TLSRelay). Every figure is printed beside its baselines, since
// absolute numbers drift on shared machines. The load comes from standard
// generators (iperf3, fortio) run inside the pods; CPU and memory are read
// from /proc.
package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/lab"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/vishvananda/netns"
)

// Scenarios are the parts of the suite, in the order they run.
var Scenarios = []string{"idle", "throughput", "latency", "storm"}

// Options tune a run.
type Options struct {
	Self     string    // the ambit binary (run inside the lab's namespaces)
	Quick    bool      // the CI smoke run: seconds per scenario, not minutes
	Only     []string  // scenarios to run; empty means all
	Out      io.Writer // the report, Markdown
	Progress io.Writer // what is happening, for a person watching
	// Idle are the idle-connection counts; default 1,000 and 10,000 (quick: 200).
	Idle []int
	// StormBoundMB is the RSS each proxy must stay under during the storm;
	// default 100.
	StormBoundMB int
	// Keep leaves the lab up afterwards, to look closer (ambit lab down --name).
	Keep bool
	// LabName names the lab (and its namespaces); default "bench".
	LabName string
	// Fortio and IPerf3 are the load generators' paths; default from $PATH
	// and then ~/go/bin.
	Fortio, IPerf3 string
}

// The bench lab: the seed's two nodes with one pod each.
const (
	clientPod  = "client"
	serverPod  = "server"
	serverIP   = "10.244.1.3"
	echoPort   = 9000 // tcp-echo, built in (idle connections)
	iperfPort  = 5201
	fortioPort = 8080
	// The TLS relay pair: the client side listens in the client pod on
	// loopback, the server side in the server pod on its IP.
	relayClientBase = 15100 // + target index
	relayServerBase = 15200
)

var relayTargets = []int{iperfPort, fortioPort, echoPort}

func topology(name string) []byte {
	return fmt.Appendf(nil, `name: %s
nodes:
- {name: master, podCIDR: 10.244.0.0/24}
- {name: worker1, podCIDR: 10.244.1.0/24}
pods:
- {name: %s, node: master, ip: 10.244.0.2, labels: {app: client}}
- {name: %s, node: worker1, ip: %s, labels: {app: server}, serve: {protocol: tcp-echo, port: %d}}
`, name, clientPod, serverPod, serverIP, echoPort)
}

// env is one run's lab and tools.
type env struct {
	o         Options
	t         *lab.Topology
	mesh      bool // pods enrolled
	report    *strings.Builder
	fileLimit int // open files per process
}

// Run runs the suite and writes the report. It needs root (the lab).
func Run(ctx context.Context, o Options) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("bench: the suite builds a lab of network namespaces, which needs root")
	}
	if o.LabName == "" {
		o.LabName = "bench"
	}
	if o.StormBoundMB == 0 {
		o.StormBoundMB = 100
	}
	if len(o.Idle) == 0 {
		o.Idle = []int{1000, 10000}
		if o.Quick {
			o.Idle = []int{200}
		}
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	for _, s := range o.Only {
		if !slices.Contains(Scenarios, s) {
			return fmt.Errorf("bench: unknown scenario %q (have %s)", s, strings.Join(Scenarios, ", "))
		}
	}
	if o.Fortio, err = findTool(o.Fortio, "fortio"); err != nil {
		return err
	}
	if o.IPerf3, err = findTool(o.IPerf3, "iperf3"); err != nil {
		return err
	}
	// 10,000 connections are 20,000 sockets in one relay process; the lab's
	// processes inherit the limit.
	fileLimit, err := raiseFileLimit(1 << 16)
	if err != nil {
		return err
	}
	data := topology(o.LabName)
	t, err := lab.ParseTopology("bench topology", data)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Progress, "bench: building lab %q\n", o.LabName)
	if err := lab.UpAll(t, data, o.Self, o.Progress, lab.UpOptions{ProxyLogLevel: "warn"}); err != nil {
		return err
	}
	defer func() {
		if o.Keep {
			fmt.Fprintf(o.Progress, "bench: lab %q left up; take it down with: ambit lab down --name %s\n", o.LabName, o.LabName)
			return
		}
		if derr := lab.Down(o.LabName); derr != nil && err == nil {
			err = derr
		}
	}()
	e := &env{o: o, t: t, mesh: true, report: &strings.Builder{}, fileLimit: fileLimit}
	if err := e.startServers(); err != nil {
		return err
	}
	e.header()
	for _, s := range Scenarios {
		if len(o.Only) > 0 && !slices.Contains(o.Only, s) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		fmt.Fprintf(o.Progress, "bench: %s\n", s)
		var err error
		switch s {
		case "idle":
			err = e.idle(ctx)
		case "throughput":
			err = e.throughput(ctx)
		case "latency":
			err = e.latency(ctx)
		case "storm":
			err = e.storm(ctx)
		}
		if err != nil {
			fmt.Fprint(o.Out, e.report.String())
			return fmt.Errorf("bench %s: %w", s, err)
		}
	}
	_, err = fmt.Fprint(o.Out, e.report.String())
	return err
}

func findTool(given, name string) (string, error) {
	if given != "" {
		return given, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	if home, err := os.UserHomeDir(); err == nil {
		p := filepath.Join(home, "go", "bin", name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("bench: %s not found on $PATH or in ~/go/bin (make bench installs it)", name)
}

// raiseFileLimit raises the open-file limit to n, or as far as the hard
// limit lets it where the hard limit cannot be raised (no CAP_SYS_RESOURCE,
// as in some containers), and returns the limit now in force.
func raiseFileLimit(n uint64) (int, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, err
	}
	if l.Cur >= n {
		return int(l.Cur), nil
	}
	want := l
	want.Cur, want.Max = n, max(l.Max, n)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
		return int(n), nil
	}
	l.Cur = l.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("bench: raise the open-file limit: %w", err)
	}
	return int(l.Cur), nil
}

func (e *env) header() {
	host, _ := os.Hostname()
	fmt.Fprintf(e.report, "# ambit bench, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(e.report, "Machine: %s, %d vCPU (%s), kernel %s. Quick: %v.\n\n", host, runtime.NumCPU(), cpuModel(), kernel(), e.o.Quick)
	fmt.Fprintf(e.report, "Three ways between the client pod (node master) and the server pod (node worker1):\n"+
		"**direct** (mesh off, plain TCP), **mesh** (both pods enrolled: capture, HBONE, capture) and\n"+
		"**tls-relay** (mesh off; one TLS 1.3 connection per TCP connection between two `io.Copy` relays in the pods).\n\n")
}

// startServers starts the load generators' servers and the TLS relay pair
// in the pods, and waits until they listen.
func (e *env) startServers() error {
	name := e.o.LabName
	serverNS, clientNS := e.t.PodNamespace(serverPod), e.t.PodNamespace(clientPod)
	if _, err := lab.Start(name, serverNS, "iperf3", e.o.Self, []string{e.o.IPerf3, "-s", "-p", strconv.Itoa(iperfPort)}); err != nil {
		return err
	}
	if _, err := lab.Start(name, serverNS, "fortio", e.o.Self, []string{e.o.Fortio, "server", "-http-port", strconv.Itoa(fortioPort),
		"-grpc-port", "disabled", "-redirect-port", "disabled", "-loglevel", "warning"}); err != nil {
		return err
	}
	caDir := filepath.Join(lab.StateDir(name), "relay-ca")
	if _, err := identity.InitCA(caDir, "ambit-bench-relay", 24*time.Hour); err != nil {
		return err
	}
	for i, target := range relayTargets {
		srv := fmt.Sprintf("%s:%d", serverIP, relayServerBase+i)
		if _, err := lab.Start(name, serverNS, fmt.Sprintf("relay-server-%d", target), e.o.Self, []string{e.o.Self, "bench", "tls-relay",
			"--server", "--listen", srv, "--connect", fmt.Sprintf("%s:%d", serverIP, target), "--ca-dir", caDir}); err != nil {
			return err
		}
		if _, err := lab.Start(name, clientNS, fmt.Sprintf("relay-client-%d", target), e.o.Self, []string{e.o.Self, "bench", "tls-relay",
			"--listen", fmt.Sprintf("127.0.0.1:%d", relayClientBase+i), "--connect", srv, "--ca-dir", caDir}); err != nil {
			return err
		}
	}
	waits := map[string][]string{serverNS: {}, clientNS: {}}
	for i := range relayTargets {
		waits[serverNS] = append(waits[serverNS], fmt.Sprintf("%s:%d", serverIP, relayServerBase+i))
		waits[clientNS] = append(waits[clientNS], fmt.Sprintf("127.0.0.1:%d", relayClientBase+i))
	}
	waits[serverNS] = append(waits[serverNS], fmt.Sprintf("127.0.0.1:%d", iperfPort), fmt.Sprintf("127.0.0.1:%d", fortioPort))
	for ns, addrs := range waits {
		for _, a := range addrs {
			if err := waitListen(ns, a, 10*time.Second); err != nil {
				return fmt.Errorf("%s in %s: %w (see the logs in %s)", a, ns, err, lab.StateDir(name))
			}
		}
	}
	return nil
}

// waitListen waits until a socket listens on addr's port in the namespace.
// It looks in /proc (the thread's namespace) instead of connecting: a
// probe connection is a client to an iperf3 server, which fails that
// "test", resets, and took the next real client's connection down with it
// (the first direct throughput run then failed in about one bench of three).
func waitListen(nsName, addr string, within time.Duration) error {
	h, err := netns.GetFromName(nsName)
	if err != nil {
		return err
	}
	defer h.Close()
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(within)
	for {
		var ok bool
		err := nsutil.Do(h, func() (err error) {
			ok, err = listening(ap.Port())
			return err
		})
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not listening on port %d after %v", ap.Port(), within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// listening reports whether a TCP socket of the calling thread's network
// namespace listens on port (any address, IPv4 or IPv6).
func listening(port uint16) (bool, error) {
	want := fmt.Sprintf(":%04X", port)
	for _, f := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
		data, err := os.ReadFile(f)
		if err != nil {
			return false, err
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			fields := strings.Fields(line)
			// sl local_address rem_address st ...; st 0A is LISTEN.
			if len(fields) > 3 && strings.HasSuffix(fields[1], want) && fields[3] == "0A" {
				return true, nil
			}
		}
	}
	return false, nil
}

// setMesh enrolls both pods (on) or takes them out of the mesh (off).
func (e *env) setMesh(on bool) error {
	if e.mesh == on {
		return nil
	}
	for _, p := range []string{clientPod, serverPod} {
		var err error
		if on {
			err = e.t.Enroll(p)
		} else {
			err = e.t.Unenroll(p)
		}
		if err != nil {
			return err
		}
	}
	e.mesh = on
	return nil
}

// way is one of the three paths, and where the client connects for a
// target port on that path.
type way struct {
	name string
	mesh bool
}

var ways = []way{{"direct", false}, {"mesh", true}, {"tls-relay", false}}

func (w way) addr(port int) string {
	if w.name == "tls-relay" {
		i := slices.Index(relayTargets, port)
		return fmt.Sprintf("127.0.0.1:%d", relayClientBase+i)
	}
	return fmt.Sprintf("%s:%d", serverIP, port)
}

// pids are the processes that carry a way's traffic: the two node proxies
// or the two relays, client side first.
func (e *env) pids(w way, port int) ([2]int, error) {
	var tags [2]string
	switch w.name {
	case "mesh":
		tags = [2]string{"proxy-master", "proxy-worker1"}
	case "tls-relay":
		tags = [2]string{fmt.Sprintf("relay-client-%d", port), fmt.Sprintf("relay-server-%d", port)}
	default:
		return [2]int{}, nil
	}
	var out [2]int
	for i, tag := range tags {
		b, err := os.ReadFile(filepath.Join(lab.StateDir(e.o.LabName), tag+".pid"))
		if err != nil {
			return out, err
		}
		if out[i], err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
			return out, err
		}
	}
	return out, nil
}

// runIn runs argv in a pod and returns its standard output.
func (e *env) runIn(ctx context.Context, pod string, argv ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, e.o.Self, append([]string{"lab", "nsexec", e.t.PodNamespace(pod), "--"}, argv...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s: %w: %s%s", strings.Join(argv, " "), err, tailLines(stderr.String(), 5), tailLines(string(out), 5))
	}
	return out, nil
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// metricSums adds up every series of each named Prometheus counter on a
// node proxy's metrics port, in one scrape; the sums come in the order of
// the names.
func (e *env) metricSums(node string, metrics ...string) ([]float64, error) {
	h, err := netns.GetFromName(e.t.NodeNamespace(node))
	if err != nil {
		return nil, err
	}
	defer h.Close()
	sums := make([]float64, len(metrics))
	err = nsutil.Do(h, func() error {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", ambient.StatsPort), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\n\r\n"); err != nil {
			return err
		}
		sc := bufio.NewScanner(c)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			for i, metric := range metrics {
				if !strings.HasPrefix(line, metric+"{") && !strings.HasPrefix(line, metric+" ") {
					continue
				}
				v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
				if err != nil {
					return fmt.Errorf("metric line %q: %w", line, err)
				}
				sums[i] += v
			}
		}
		return sc.Err()
	})
	return sums, err
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func kernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

// decodeJSON decodes out from JSON, naming what failed.
func decodeJSON(what string, data []byte, out any) error {
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("%s: bad JSON (%w): %s", what, err, tailLines(string(data), 3))
	}
	return nil
}
