package e2e

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// streamed is a transfer from a pod (testapp stream) run by a kubectl exec
// in the background: its stdin says when to finish.
type streamed struct {
	mu    sync.Mutex
	out   strings.Builder
	done  chan struct{}
	err   error // the command's, once done
	stdin io.WriteCloser
}

func (s *streamed) output() string { s.mu.Lock(); defer s.mu.Unlock(); return s.out.String() }
func (s *streamed) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.Write(p)
}

// ups counts the transfer's progress lines.
func (s *streamed) ups() int { return strings.Count(s.output(), "up ") }

func (e *env) stream(ns, pod, addr string) *streamed {
	e.t.Helper()
	s := &streamed{done: make(chan struct{})}
	cmd := e.kubectlCmd("-n", ns, "exec", "-i", pod, "--", "/testapp", "stream", addr)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	s.stdin = stdin
	cmd.Stdout, cmd.Stderr = s, s
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	go func() { s.err = cmd.Wait(); close(s.done) }() // ends with the command
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); <-s.done })
	e.wait(30*time.Second, "the transfer under way", func() error {
		select {
		case <-s.done:
			return fmt.Errorf("ended at once: %s", s.output())
		default:
		}
		if s.ups() == 0 {
			return fmt.Errorf("not up: %q", s.output())
		}
		return nil
	})
	return s
}

// rollingUpdateResetsNothing is the DaemonSet's rolling update during a
// long transfer between two meshed pods (ztunnel has it open as
// istio/ztunnel#1191). With maxSurge the new node pod starts beside the
// old one and its proxy opens the pods' listeners beside the old proxy's
// (SO_REUSEPORT); the old pod is then stopped and its proxy drains. The
// transfer goes on across the old proxy's SIGTERM and ends, every byte
// checked, without a reset; the update completes; requests then go
// through the new proxies.
func (e *env) rollingUpdateResetsNothing(serverIP, wantPeer string) {
	e.rollingUpdateOf("ambit-system", "ambit-node", "app=ambit-node", serverIP, wantPeer)
}

// rollingUpdateOf is rollingUpdateResetsNothing for the node proxies'
// DaemonSet ns/ds, whose pods selector selects.
func (e *env) rollingUpdateOf(ns, ds, selector, serverIP, wantPeer string) {
	t := e.t
	t.Helper()
	before := map[string]bool{}
	l, err := e.kc.CoreV1().Pods(ns).List(e.ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range l.Items {
		before[p.Name] = true
	}
	s := e.stream("demo", "client", serverIP+":9000")
	start := time.Now()
	e.kubectl("-n", ns, "rollout", "restart", "daemonset/"+ds)
	// The first old node pod told to stop (SIGTERM: its deletion began).
	var stopping string
	e.wait(4*time.Minute, "an old node pod stopping", func() error {
		l, err := e.kc.CoreV1().Pods(ns).List(e.ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return err
		}
		seen := map[string]bool{}
		for _, p := range l.Items {
			seen[p.Name] = true
			if before[p.Name] && p.DeletionTimestamp != nil {
				stopping = p.Name + " on " + p.Spec.NodeName
				return nil
			}
		}
		for name := range before {
			if !seen[name] {
				stopping = name
				return nil
			}
		}
		return fmt.Errorf("none yet")
	})
	// The transfer still moves after that proxy's SIGTERM (two more
	// reports of bytes back), then is told to finish.
	ups := s.ups()
	e.wait(time.Minute, "the transfer moving while the old proxy drains", func() error {
		select {
		case <-s.done:
			return nil // reported below
		default:
		}
		if s.ups() < ups+2 {
			return fmt.Errorf("%d reports", s.ups()-ups)
		}
		return nil
	})
	_, _ = io.WriteString(s.stdin, "stop\n")
	s.stdin.Close()
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		t.Fatalf("the transfer did not finish when told:\n%s", s.output())
	}
	if s.err != nil || !strings.Contains(s.output(), "done ") {
		t.Fatalf("the transfer across the rolling update (old node pod %s stopped %v in): %v\n%s", stopping, time.Since(start).Round(time.Second), s.err, s.output())
	}
	lines := strings.Split(strings.TrimSpace(s.output()), "\n")
	t.Logf("a transfer across the rolling update (node pod %s stopped while it ran): %s, no reset", stopping, lines[len(lines)-1])
	if out, err := e.c.Kubectl(e.ctx, "-n", ns, "rollout", "status", "daemonset/"+ds, "--timeout=5m"); err != nil {
		t.Fatalf("the rolling update: %v\n%s", err, out)
	}
	e.waitDaemonSet(ns, ds, len(e.c.Nodes))
	if out := e.exec("demo", "client", "/testapp", "get", "http://"+serverIP+":8080/"); !strings.Contains(out, wantPeer) {
		t.Errorf("after the rolling update: %q", out)
	}
	t.Logf("rolling update done in %v", time.Since(start).Round(time.Second))
}
