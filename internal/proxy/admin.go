package proxy

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"
)

func (p *Proxy) serveHTTP(l net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	_ = srv.Serve(l) // ends when Run closes the listener
}

// serveAdmin: /config_dump, /logging, /debug/pprof.
func (p *Proxy) serveAdmin(l net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("/config_dump", p.configDump)
	mux.HandleFunc("/logging", p.logging)
	mux.HandleFunc("/quitquitquit", p.quitquitquit)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintln(w, "ambit admin: /config_dump /logging[?level=debug|info|warn|error] /quitquitquit (POST) /debug/pprof/")
	})
	p.serveHTTP(l, mux)
}

// quitquitquit (POST, as ztunnel's and Envoy's) stops the proxy as SIGTERM
// does: listeners closed, GOAWAY, live connections given the drain time.
func (p *Proxy) quitquitquit(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "POST to stop the proxy", http.StatusMethodNotAllowed)
		return
	}
	p.log.Info("asked to stop on the admin port (/quitquitquit)", "peer", r.RemoteAddr)
	p.quitOnce.Do(func() { close(p.quit) })
	fmt.Fprintln(w, "OK")
}

func (p *Proxy) serveMetrics(l net.Listener) {
	mux := http.NewServeMux()
	if p.opts.Metrics != nil {
		mux.Handle("/metrics", p.opts.Metrics.Handler())
		mux.Handle("/stats/prometheus", p.opts.Metrics.Handler())
	}
	p.serveHTTP(l, mux)
}

func (p *Proxy) serveReady(l net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		ok, why := p.Ready()
		if !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, why)
	})
	p.serveHTTP(l, mux)
}

func (p *Proxy) logging(w http.ResponseWriter, r *http.Request) {
	lv := p.opts.LogLevel
	if lv == nil {
		http.Error(w, "this proxy's log level is fixed", http.StatusNotImplemented)
		return
	}
	if s := r.URL.Query().Get("level"); s != "" {
		if r.Method != http.MethodPost && r.Method != http.MethodPut {
			http.Error(w, "change the level with POST /logging?level=...", http.StatusMethodNotAllowed)
			return
		}
		var l slog.Level
		if err := l.UnmarshalText([]byte(strings.ToUpper(s))); err != nil {
			http.Error(w, fmt.Sprintf("level %q: want debug, info, warn or error", s), http.StatusBadRequest)
			return
		}
		lv.Set(l)
		p.log.Info("log level changed", "level", l.String())
	}
	fmt.Fprintf(w, "level: %s\n", strings.ToLower(lv.Level().String()))
}
