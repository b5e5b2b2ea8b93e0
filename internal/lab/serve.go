package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// Serve runs a pod's built-in server on port until ctx ends: "http"
// answers every request with who it is and who called (so the client's
// preserved IP shows), "tcp-echo" echoes with half-close.
func Serve(ctx context.Context, protocol string, port uint16, log *slog.Logger) error {
	l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	log.Info("serving", "protocol", protocol, "addr", l.Addr().String())
	go func() { <-ctx.Done(); l.Close() }()
	switch protocol {
	case "http":
		srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			log.Info("request", "from", r.RemoteAddr, "method", r.Method, "path", r.URL.Path)
			fmt.Fprintf(w, "hello from %s; you are %s\n", r.Context().Value(http.LocalAddrContextKey), r.RemoteAddr)
		})}
		go func() { <-ctx.Done(); srv.Close() }()
		if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	case "tcp-echo":
		for {
			c, err := l.Accept()
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			log.Debug("connection", "from", c.RemoteAddr().String())
			go func() {
				defer c.Close()
				// Not io.Copy(c, c): between two TCP sockets it splices, and
				// a blocked splice holds a pipe (two more descriptors) per
				// idle connection, so the echo ran out of files at a third
				// of its limit.
				io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{c}, make([]byte, 16<<10))
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}
	return fmt.Errorf("unknown protocol %q", protocol)
}
