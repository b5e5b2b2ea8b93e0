// Command testapp is the workload of the cluster tests' pods, and their
// pause container: one static binary, so the test cluster needs no
// registry and no image but two it builds (tools/mkimage).
//
//	testapp [pause]         sleep as the pod's PID 1 until TERM, reaping orphans
//	                        (no arguments: the runtime starts the sandbox so)
//	testapp serve ADDR      HTTP: "hello from LOCAL; you are REMOTE" (the client's address as seen),
//	                        and a TCP echo on port 9000
//	testapp get URL         one GET; the body on stdout; exit 1 on any error or non-200
//	testapp hold ADDR       a TCP connection held open, printing a line per second it stays up
//	testapp stream ADDR     a transfer to an echo at ADDR, checked byte by byte, until stdin
//	                        says stop (or ends): "up N" a second, then "done N bytes"; exit 1
//	                        if the connection breaks
//
// It is not part of the mesh: no package of Ambit imports it.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		os.Args = append(os.Args, "pause")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch cmd := os.Args[1]; {
	case cmd == "pause":
		err = pause(ctx)
	case cmd == "serve" && len(os.Args) == 3:
		err = serve(ctx, os.Args[2])
	case cmd == "get" && len(os.Args) == 3:
		err = get(ctx, os.Args[2])
	case cmd == "hold" && len(os.Args) == 3:
		err = hold(ctx, os.Args[2])
	case cmd == "stream" && len(os.Args) == 3:
		err = stream(ctx, os.Args[2], os.Stdin)
	default:
		err = fmt.Errorf("unknown command or wrong arguments: %q", os.Args[1:])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		os.Exit(1)
	}
}

// pause is the sandbox's process: it holds the pod's namespaces and, as
// PID 1 of the pod, reaps what the pod's containers orphan.
func pause(ctx context.Context) error {
	chld := make(chan os.Signal, 1)
	signal.Notify(chld, syscall.SIGCHLD)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-chld:
			for {
				var ws syscall.WaitStatus
				if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
					break
				}
			}
		}
	}
}

func serve(ctx context.Context, addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(os.Stderr, "request from %s %s %s\n", r.RemoteAddr, r.Method, r.URL.Path)
		fmt.Fprintf(w, "hello from %s (%s); you are %s\n", host, r.Context().Value(http.LocalAddrContextKey), r.RemoteAddr)
	})}
	go func() { <-ctx.Done(); srv.Close() }() // ends with serve
	el, err := net.Listen("tcp", ":9000")
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); el.Close() }()
	go echo(el)
	fmt.Fprintf(os.Stderr, "serving HTTP on %s\n", l.Addr())
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func get(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: &http.Transport{Proxy: nil}}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(os.Stdout, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// hold opens one connection and keeps it until the peer or the mesh ends
// it: a test sees the moment a policy closes a live connection.
func hold(ctx context.Context, addr string) error {
	d := net.Dialer{Timeout: 10 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Printf("connected %s -> %s\n", c.LocalAddr(), c.RemoteAddr())
	// An HTTP request keeps the server's side of the exchange honest; the
	// connection then stays open (keep-alive) until someone closes it.
	if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: hold\r\n\r\n"); err != nil {
		return err
	}
	closed := make(chan error, 1)
	go func() { // ends when c is closed, by the peer or by the deferred Close
		_, err := io.Copy(io.Discard, c)
		closed <- err
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-closed:
			return fmt.Errorf("connection closed: %v", err)
		case <-tick.C:
			fmt.Println("up")
		}
	}
}

// echo copies back what each connection sends, then half-closes.
func echo(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
	}
}

// pattern is the stream's byte at offset i: a lost, repeated or reordered
// byte shows.
func pattern(i int64) byte { return byte(i*7 + i>>8) }

// stream sends 16 KiB every 50 ms to an echo and checks every byte that
// comes back, until control says stop (a line, or its end); then it
// half-closes, reads the rest and reports the total. A test holds a
// transfer open across an event (an upgrade) and ends it when it chooses.
func stream(ctx context.Context, addr string, control io.Reader) error {
	d := net.Dialer{Timeout: 10 * time.Second}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	c := nc.(*net.TCPConn)
	defer c.Close()
	fmt.Printf("connected %s -> %s\n", c.LocalAddr(), c.RemoteAddr())
	stop := make(chan struct{})
	go func() { _, _ = io.ReadAll(io.LimitReader(control, 1)); close(stop) }() // any byte, or EOF
	type result struct {
		n   int64
		err error
	}
	back := make(chan result, 1)
	var sent int64
	var got atomic.Int64 // bytes back, for the reports
	go func() {
		buf := make([]byte, 32<<10)
		var n int64
		for {
			k, err := c.Read(buf)
			for _, b := range buf[:k] {
				if b != pattern(n) {
					back <- result{n, fmt.Errorf("byte %d came back wrong", n)}
					return
				}
				n++
			}
			if errors.Is(err, io.EOF) {
				back <- result{n, nil}
				return
			}
			if err != nil {
				back <- result{n, err}
				return
			}
			got.Store(n)
		}
	}()
	chunk := make([]byte, 16<<10)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	report := time.NewTicker(time.Second)
	defer report.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case r := <-back:
			return fmt.Errorf("connection broken after %d bytes sent, %d back: %v", sent, r.n, r.err)
		case <-report.C:
			fmt.Printf("up %d\n", got.Load())
		case <-tick.C:
			for i := range chunk {
				chunk[i] = pattern(sent + int64(i))
			}
			if _, err := c.Write(chunk); err != nil {
				return fmt.Errorf("connection broken after %d bytes sent: %v", sent, err)
			}
			sent += int64(len(chunk))
		case <-stop:
			if err := c.CloseWrite(); err != nil {
				return err
			}
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			r := <-back
			if r.err != nil || r.n != sent {
				return fmt.Errorf("after stop: %d of %d bytes back: %v", r.n, sent, r.err)
			}
			fmt.Printf("done %d bytes\n", r.n)
			return nil
		}
	}
}
