package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/lab"
)

func (e *env) dur(full, quick time.Duration) time.Duration {
	if e.o.Quick {
		return quick
	}
	return full
}

// throughput: iperf3, 1 and 8 connections, both directions, three ways,
// in rounds: each round measures every way once, so a mesh figure is
// paired with a relay figure taken minutes apart at most, and the report
// gives the median ratio of the rounds with its range (one 5 s run per
// cell swung 0.67–1.06 between runs on this 2-vCPU VM).
func (e *env) throughput(ctx context.Context) error {
	secs := int(e.dur(5*time.Second, time.Second).Seconds())
	rounds := 3
	if e.o.Quick {
		rounds = 1
	}
	type key struct {
		way     string
		reverse bool
		conns   int
	}
	mbps := map[key][]float64{}
	for round := range rounds {
		for _, w := range ways {
			if err := e.setMesh(w.mesh); err != nil {
				return err
			}
			host, port, _ := strings.Cut(w.addr(iperfPort), ":")
			for _, reverse := range []bool{false, true} {
				for _, conns := range []int{1, 8} {
					v, err := e.iperf(ctx, host, port, secs, conns, reverse)
					if err != nil {
						return fmt.Errorf("%s: %w", w.name, err)
					}
					k := key{w.name, reverse, conns}
					mbps[k] = append(mbps[k], v)
					fmt.Fprintf(e.o.Progress, "  round %d %-9s %-15s %d conn: %7.0f MB/s\n", round+1, w.name, dirName(reverse), conns, v)
				}
			}
		}
	}
	r := e.report
	fmt.Fprintf(r, "## Throughput (iperf3, %d s per run, %d rounds, MB/s = 10^6 bytes/s)\n\n", secs, rounds)
	if rounds > 1 {
		fmt.Fprintf(r, "Each round runs every way once; MB/s are medians of the rounds, ratios the median of the rounds' ratios with their range.\n\n")
	}
	fmt.Fprintf(r, "| direction | conns | direct | tls-relay | mesh | **mesh / tls-relay** | mesh / direct | tls-relay / direct |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	ratio := func(a, b []float64) string {
		q := make([]float64, len(a))
		for i := range a {
			q[i] = a[i] / b[i]
		}
		if len(q) == 1 {
			return fmt.Sprintf("%.2f", q[0])
		}
		return fmt.Sprintf("%.2f (%.2f–%.2f)", median(q), slices.Min(q), slices.Max(q))
	}
	for _, reverse := range []bool{false, true} {
		for _, conns := range []int{1, 8} {
			d, t, m := mbps[key{"direct", reverse, conns}], mbps[key{"tls-relay", reverse, conns}], mbps[key{"mesh", reverse, conns}]
			fmt.Fprintf(r, "| %s | %d | %.0f | %.0f | %.0f | **%s** | %s | %s |\n", dirName(reverse), conns, median(d), median(t), median(m), ratio(m, t), ratio(m, d), ratio(t, d))
		}
	}
	fmt.Fprintf(r, "\nTarget: mesh / tls-relay >= 0.80.\n\n")
	return nil
}

// iperf runs one iperf3 client in the client pod and returns MB/s received.
func (e *env) iperf(ctx context.Context, host, port string, secs, conns int, reverse bool) (float64, error) {
	argv := []string{e.o.IPerf3, "-c", host, "-p", port, "-t", strconv.Itoa(secs), "-P", strconv.Itoa(conns), "-J"}
	if reverse {
		argv = append(argv, "-R")
	}
	if !e.o.Quick {
		argv = append(argv, "-O", "1") // leave out the first second (slow start)
	}
	out, err := e.runIn(ctx, clientPod, argv...)
	if err != nil {
		return 0, err
	}
	var r struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := decodeJSON("iperf3", out, &r); err != nil {
		return 0, err
	}
	if r.Error != "" || r.End.SumReceived.BitsPerSecond == 0 {
		return 0, fmt.Errorf("iperf3: %q (no throughput)", r.Error)
	}
	return r.End.SumReceived.BitsPerSecond / 8 / 1e6, nil
}

func dirName(reverse bool) string {
	if reverse {
		return "server → client"
	}
	return "client → server"
}

// fortioResult is the part of fortio's JSON the suite reads.
type fortioResult struct {
	ActualQPS         float64
	RetCodes          map[string]int
	SocketCount       int
	DurationHistogram struct {
		Count       int
		Percentiles []struct {
			Percentile float64
			Value      float64 // seconds
		}
	}
}

func (f fortioResult) pct(p float64) time.Duration {
	for _, x := range f.DurationHistogram.Percentiles {
		if x.Percentile == p {
			return time.Duration(x.Value * float64(time.Second))
		}
	}
	return -1
}

func (f fortioResult) errors() int {
	n := 0
	for code, c := range f.RetCodes {
		if code != "200" {
			n += c
		}
	}
	return n
}

// fortio runs one fortio load from the client pod against the server's
// echo handler, 1 KiB each way.
func (e *env) fortio(ctx context.Context, addr string, qps, conns int, d time.Duration, keepAlive bool) (fortioResult, error) {
	file := filepath.Join(lab.StateDir(e.o.LabName), "fortio.json")
	os.Remove(file)
	argv := []string{e.o.Fortio, "load", "-qps", strconv.Itoa(qps), "-c", strconv.Itoa(conns), "-t", d.String(),
		"-payload-size", "1024", "-r", "0.00001", "-p", "50,90,99", "-loglevel", "error", "-json", file,
		"-keepalive=" + strconv.FormatBool(keepAlive), "http://" + addr + "/echo"}
	var f fortioResult
	if _, err := e.runIn(ctx, clientPod, argv...); err != nil {
		return f, err
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return f, err
	}
	if err := decodeJSON("fortio", data, &f); err != nil {
		return f, err
	}
	if f.DurationHistogram.Count == 0 {
		return f, fmt.Errorf("fortio against %s: no requests completed", addr)
	}
	return f, nil
}

// load is what /proc said about the two processes carrying a way's
// traffic over one run.
type load struct {
	cpu   [2]float64 // vCPU-seconds per second
	rssKB [2]int64   // at the end
	peak  [2]int64   // VmHWM over the run
}

// measure runs f while watching a way's two processes.
func (e *env) measure(w way, port int, f func() error) (load, error) {
	var l load
	pids, err := e.pids(w, port)
	if err != nil {
		return l, err
	}
	if pids[0] == 0 {
		return l, f()
	}
	var before [2]procSample
	for i, pid := range pids {
		if err := resetPeak(pid); err != nil {
			return l, fmt.Errorf("reset peak RSS of %d: %w", pid, err)
		}
		if before[i], err = sampleProc(pid); err != nil {
			return l, err
		}
	}
	if err := f(); err != nil {
		return l, err
	}
	for i, pid := range pids {
		after, err := sampleProc(pid)
		if err != nil {
			return l, err
		}
		l.cpu[i], l.rssKB[i], l.peak[i] = cpuRate(before[i], after), after.rssKB, after.peakKB
	}
	return l, nil
}

// latency: fortio at 1000 req/s, 1 KiB each way, keep-alive and a new
// connection per request; with the CPU and RSS of the processes that carry
// the traffic.
func (e *env) latency(ctx context.Context) error {
	d := e.dur(15*time.Second, 2*time.Second)
	const qps, conns = 1000, 8
	type key struct {
		way       string
		keepAlive bool
	}
	res := map[key]fortioResult{}
	loads := map[key]load{}
	for _, w := range ways {
		if err := e.setMesh(w.mesh); err != nil {
			return err
		}
		for _, ka := range []bool{true, false} {
			var f fortioResult
			l, err := e.measure(w, fortioPort, func() (err error) {
				f, err = e.fortio(ctx, w.addr(fortioPort), qps, conns, d, ka)
				return err
			})
			if err != nil {
				return fmt.Errorf("%s: %w", w.name, err)
			}
			res[key{w.name, ka}], loads[key{w.name, ka}] = f, l
			fmt.Fprintf(e.o.Progress, "  %-9s %-14s p50 %v p90 %v p99 %v, %.0f req/s, %d errors\n", w.name, connMode(ka),
				f.pct(50), f.pct(90), f.pct(99), f.ActualQPS, f.errors())
		}
	}
	r := e.report
	fmt.Fprintf(r, "## Latency at %d req/s (fortio, %d connections, 1 KiB request and response, %v per run)\n\n", qps, conns, d)
	fmt.Fprintf(r, "| connections | way | p50 | p90 | p99 | req/s | errors | **added p50** | **added p90** | **added p99** |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	us := func(d time.Duration) string { return fmt.Sprintf("%.0f µs", float64(d)/1e3) }
	for _, ka := range []bool{true, false} {
		base := res[key{"direct", ka}]
		for _, w := range ways {
			f := res[key{w.name, ka}]
			added := [3]string{"", "", ""}
			if w.name != "direct" {
				for i, p := range []float64{50, 90, 99} {
					added[i] = "**" + us(f.pct(p)-base.pct(p)) + "**"
				}
			}
			fmt.Fprintf(r, "| %s | %s | %s | %s | %s | %.0f | %d | %s | %s | %s |\n", connMode(ka), w.name,
				us(f.pct(50)), us(f.pct(90)), us(f.pct(99)), f.ActualQPS, f.errors(), added[0], added[1], added[2])
		}
	}
	fmt.Fprintf(r, "\nTarget: added p99 of the mesh (both proxies) <= 200 µs.\n\n")
	fmt.Fprintf(r, "## CPU and memory at %d req/s (from /proc over the same runs)\n\n", qps)
	fmt.Fprintf(r, "| connections | way | client side vCPU | server side vCPU | client side RSS | server side RSS |\n| --- | --- | ---: | ---: | ---: | ---: |\n")
	for _, ka := range []bool{true, false} {
		for _, w := range ways[1:] {
			l := loads[key{w.name, ka}]
			fmt.Fprintf(r, "| %s | %s | %.3f | %.3f | %.1f MB | %.1f MB |\n", connMode(ka), w.name, l.cpu[0], l.cpu[1], mb(l.rssKB[0]), mb(l.rssKB[1]))
		}
	}
	fmt.Fprintf(r, "\nTarget: <= 0.06 vCPU per proxy at 1000 req/s. (mesh: the node proxies; tls-relay: the two relays.)\n\n")
	return nil
}

func connMode(keepAlive bool) string {
	if keepAlive {
		return "keep-alive"
	}
	return "new per request"
}

func mb(kb int64) float64 { return float64(kb) / 1000 }

// idle: RSS of the processes on the path while they hold N idle
// connections, on fresh proxies.
func (e *env) idle(ctx context.Context) error {
	if err := e.restartProxies(); err != nil {
		return err
	}
	type row struct {
		way     string
		n       int
		base    [2]procSample
		at      [2]procSample // 3 s after the last set-up
		settled [2]procSample // 12 s after it
		held    HoldResult
	}
	var rows []row
	var skipped []string
	for _, w := range []way{ways[1], ways[2]} {
		if err := e.setMesh(w.mesh); err != nil {
			return err
		}
		pids, err := e.pids(w, echoPort)
		if err != nil {
			return err
		}
		var base [2]procSample
		for i, pid := range pids {
			if base[i], err = sampleProc(pid); err != nil {
				return err
			}
		}
		for _, n := range e.o.Idle {
			if w.name == "tls-relay" && 2*n+100 > e.fileLimit {
				// The client side relay holds two sockets per connection.
				skipped = append(skipped, fmt.Sprintf("tls-relay at %d connections (needs %d open files, the limit here is %d)", n, 2*n+100, e.fileLimit))
				continue
			}
			held, err := e.hold(ctx, w.addr(echoPort), n)
			if err != nil {
				return fmt.Errorf("%s: %w", w.name, err)
			}
			// Two samples: right after the burst of set-ups, and once the
			// connections have been idle long enough for the proxy to give
			// the burst's garbage and free pages back (memtrim: a look every
			// 5 s, a trim after a quiet one, so within 10 s).
			time.Sleep(3 * time.Second)
			rw := row{way: w.name, n: n, base: base, held: held}
			for i, pid := range pids {
				if rw.at[i], err = sampleProc(pid); err != nil {
					return err
				}
			}
			time.Sleep(9 * time.Second)
			for i, pid := range pids {
				if rw.settled[i], err = sampleProc(pid); err != nil {
					return err
				}
			}
			if err := lab.Stop(e.o.LabName, "hold"); err != nil {
				return err
			}
			rows = append(rows, rw)
			fmt.Fprintf(e.o.Progress, "  %-9s %6d idle: %s; RSS %.1f / %.1f MB, idle 12 s: %.1f / %.1f MB\n", w.name, n, held,
				mb(rw.at[0].rssKB), mb(rw.at[1].rssKB), mb(rw.settled[0].rssKB), mb(rw.settled[1].rssKB))
			time.Sleep(time.Second) // let the closes finish
		}
	}
	r := e.report
	fmt.Fprintf(r, "## Memory with idle connections (client pod → server pod's echo, each proved by a round trip, then idle)\n\n")
	fmt.Fprintf(r, "RSS = anon (the process's own: heap, stacks) + file (mapped pages of the binary, shared by every ambit process on the node). ")
	fmt.Fprintf(r, "Sampled 3 s after the last connection was set up, and again after 12 s idle (by then a quiet node proxy has given the set-up's garbage and free heap back: `internal/memtrim`); KB/conn from the second.\n\n")
	fmt.Fprintf(r, "| way | connections | held | client side RSS at 3 s (anon + file) | server side at 3 s | client side idle 12 s | server side idle 12 s | client side KB/conn | server side KB/conn |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	cell := func(p procSample) string {
		return fmt.Sprintf("%.1f MB (%.1f + %.1f)", mb(p.rssKB), mb(p.anonKB), mb(p.fileKB))
	}
	last := ""
	for _, rw := range rows {
		if rw.way != last {
			fmt.Fprintf(r, "| %s | 0 | | %s | %s | | | | |\n", rw.way, cell(rw.base[0]), cell(rw.base[1]))
		}
		last = rw.way
		per := func(i int) float64 {
			return float64(rw.settled[i].rssKB-rw.base[i].rssKB) / float64(max(rw.held.Held, 1))
		}
		fmt.Fprintf(r, "| %s | %d | %d | %s | %s | %s | %s | %.1f | %.1f |\n", rw.way, rw.n, rw.held.Held,
			cell(rw.at[0]), cell(rw.at[1]), cell(rw.settled[0]), cell(rw.settled[1]), per(0), per(1))
	}
	fmt.Fprintf(r, "\nTarget: <= 40 MB RSS per proxy with 10,000 idle connections (held idle: the 12 s columns). Failed connections: ")
	fails := []string{}
	for _, rw := range rows {
		if rw.held.Failed > 0 {
			fails = append(fails, fmt.Sprintf("%s %d: %s", rw.way, rw.n, rw.held))
		}
	}
	if len(fails) == 0 {
		fmt.Fprintf(r, "none.\n\n")
	} else {
		fmt.Fprintf(r, "%s.\n\n", strings.Join(fails, "; "))
	}
	if len(skipped) > 0 {
		fmt.Fprintf(r, "Not measured: %s.\n\n", strings.Join(skipped, "; "))
	}
	return nil
}

// restartProxies gives a scenario fresh node proxies, so what it measures
// of their memory is its own, not what an earlier scenario left in the heap.
func (e *env) restartProxies() error {
	fmt.Fprintf(e.o.Progress, "  restarting the node proxies (fresh processes)\n")
	for _, n := range []string{"master", "worker1"} {
		if err := e.t.StopProxy(n); err != nil {
			return err
		}
		if err := e.t.StartProxy(n, e.o.Self); err != nil {
			return err
		}
	}
	time.Sleep(time.Second)
	return nil
}

// hold opens n idle connections from the client pod (a background
// `ambit bench hold`) and returns once they are all open.
func (e *env) hold(ctx context.Context, addr string, n int) (HoldResult, error) {
	ready := filepath.Join(lab.StateDir(e.o.LabName), "hold.ready")
	os.Remove(ready)
	if _, err := lab.Start(e.o.LabName, e.t.PodNamespace(clientPod), "hold", e.o.Self, []string{e.o.Self, "bench", "hold",
		"--addr", addr, "--conns", strconv.Itoa(n), "--ready-file", ready}); err != nil {
		return HoldResult{}, err
	}
	deadline := time.Now().Add(time.Duration(n)*5*time.Millisecond + 30*time.Second)
	for {
		if b, err := os.ReadFile(ready); err == nil && len(b) > 0 {
			var res HoldResult
			if err := decodeJSON("hold", b, &res); err != nil {
				return res, err
			}
			return res, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			_ = lab.Stop(e.o.LabName, "hold")
			return HoldResult{}, fmt.Errorf("hold %d connections to %s: not done in time (see %s)", n, addr,
				filepath.Join(lab.StateDir(e.o.LabName), "hold.log"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// storm: new connections as fast as fortio opens them (one request each)
// at rising concurrency, through the mesh, with direct TCP beside it; the
// proxies' CPU and peak RSS meanwhile, and an account of every connection.
func (e *env) storm(ctx context.Context) error {
	d := e.dur(5*time.Second, 2*time.Second)
	levels := []int{8, 32, 128}
	if e.o.Quick {
		levels = []int{16}
	}
	type row struct {
		conns          int
		direct, mesh   fortioResult
		l              load
		opened, failed float64 // client side proxy, deltas
		inbound        float64 // server side proxy's opened, delta
		lost           int
	}
	if err := e.restartProxies(); err != nil {
		return err
	}
	var rows []row
	for _, c := range levels {
		rw := row{conns: c}
		if err := e.setMesh(false); err != nil {
			return err
		}
		var err error
		if rw.direct, err = e.fortio(ctx, ways[0].addr(fortioPort), 0, c, d, false); err != nil {
			return fmt.Errorf("direct: %w", err)
		}
		if err := e.setMesh(true); err != nil {
			return err
		}
		before, err := e.connCounts()
		if err != nil {
			return fmt.Errorf("proxy metrics: %w", err)
		}
		rw.l, err = e.measure(ways[1], fortioPort, func() (err error) {
			rw.mesh, err = e.fortio(ctx, ways[1].addr(fortioPort), 0, c, d, false)
			return err
		})
		if err != nil {
			return fmt.Errorf("mesh: %w", err)
		}
		time.Sleep(500 * time.Millisecond) // the last closes
		after, err := e.connCounts()
		if err != nil {
			return fmt.Errorf("proxy metrics: %w", err)
		}
		rw.opened, rw.failed, rw.inbound = after[0]-before[0], after[1]-before[1], after[2]-before[2]
		rw.lost = rw.mesh.SocketCount - int(rw.opened+rw.failed)
		rows = append(rows, rw)
		fmt.Fprintf(e.o.Progress, "  %4d concurrent: direct %.0f conn/s, mesh %.0f conn/s; sockets %d = opened %.0f + failed %.0f; peak RSS %.1f / %.1f MB\n",
			c, rw.direct.ActualQPS, rw.mesh.ActualQPS, rw.mesh.SocketCount, rw.opened, rw.failed, mb(rw.l.peak[0]), mb(rw.l.peak[1]))
	}
	r := e.report
	fmt.Fprintf(r, "## Connection storm (fortio, a new connection per 1 KiB request, as fast as it goes, %v per level)\n\n", d)
	fmt.Fprintf(r, "| concurrent | direct conn/s | mesh conn/s | mesh / direct | client side vCPU | server side vCPU | client side peak RSS | server side peak RSS | client sockets | opened + failed (client side proxy) | opened (server side proxy) | errors | unaccounted |\n")
	fmt.Fprintf(r, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	bound := true
	for _, rw := range rows {
		fmt.Fprintf(r, "| %d | %.0f | %.0f | %.2f | %.2f | %.2f | %.1f MB | %.1f MB | %d | %.0f + %.0f | %.0f | %d | %d |\n",
			rw.conns, rw.direct.ActualQPS, rw.mesh.ActualQPS, rw.mesh.ActualQPS/rw.direct.ActualQPS, rw.l.cpu[0], rw.l.cpu[1],
			mb(rw.l.peak[0]), mb(rw.l.peak[1]), rw.mesh.SocketCount, rw.opened, rw.failed, rw.inbound, rw.mesh.errors(), rw.lost)
		if mb(rw.l.peak[0]) > float64(e.o.StormBoundMB) || mb(rw.l.peak[1]) > float64(e.o.StormBoundMB) {
			bound = false
		}
	}
	verdict := "holds"
	if !bound {
		verdict = "**exceeded**"
	}
	fmt.Fprintf(r, "\nBound: peak RSS of each proxy <= %d MB during the storm: %s. Every client socket must be counted by the client side proxy as opened or failed (unaccounted = 0).\n\n", e.o.StormBoundMB, verdict)
	for _, rw := range rows {
		if rw.lost != 0 {
			return fmt.Errorf("storm at %d concurrent: %d connections unaccounted for (client sockets %d, proxy opened %.0f failed %.0f)",
				rw.conns, rw.lost, rw.mesh.SocketCount, rw.opened, rw.failed)
		}
	}
	if !bound {
		return fmt.Errorf("storm: a proxy's peak RSS exceeded the %d MB bound", e.o.StormBoundMB)
	}
	return nil
}

// connCounts scrapes each proxy once: the client side's opened and failed
// connections, then the server side's opened.
func (e *env) connCounts() ([3]float64, error) {
	var out [3]float64
	client, err := e.metricSums("master", "istio_tcp_connections_opened_total", "istio_tcp_connections_failed_total")
	if err != nil {
		return out, err
	}
	server, err := e.metricSums("worker1", "istio_tcp_connections_opened_total")
	if err != nil {
		return out, err
	}
	return [3]float64{client[0], client[1], server[0]}, nil
}

// median of a non-empty sample (the mean of the middle two for an even count).
func median(v []float64) float64 {
	s := slices.Sorted(slices.Values(v))
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}
