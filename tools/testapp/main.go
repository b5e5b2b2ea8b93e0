// Command testapp is the workload of the cluster tests' pods, and their
// pause container: one static binary, so the test cluster needs no
// registry and no image but two it builds (tools/mkimage).
//
//	testapp [pause]         sleep as the pod's PID 1 until TERM, reaping orphans
//	                        (no arguments: the runtime starts the sandbox so)
//	testapp serve ADDR      HTTP: "hello from LOCAL; you are REMOTE" (the client's address as seen)
//	testapp get URL         one GET; the body on stdout; exit 1 on any error or non-200
//	testapp hold ADDR       a TCP connection held open, printing a line per second it stays up
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
