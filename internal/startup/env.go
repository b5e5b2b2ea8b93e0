package startup

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
)

// The environment contract: `ambit proxy` given no mesh flags configures
// itself from the variables Istio's ztunnel chart sets, as ztunnel reads
// them (ztunnel src/config.rs). docs/drop-in.md lists every variable and
// what Ambit does with it; envSupported, envIgnored and envRefused below
// are that list, and a test holds the two together.

// Defaults of ztunnel's, where the chart sets nothing.
const (
	DefaultTokenFile    = "./var/run/secrets/tokens/istio-token"
	DefaultRootCertFile = "./var/run/secrets/istio/root-cert.pem"
	DefaultInpodUDS     = "/var/run/ztunnel/ztunnel.sock"
	// SystemRoots, as XDS_ROOT_CA or CA_ROOT_CA, trusts the system's roots.
	SystemRoots = "SYSTEM"
)

// envSupported are the variables Ambit acts on (the pod's own, read by
// SelfFromEnv, included).
var envSupported = []string{
	"XDS_ADDRESS", "CA_ADDRESS", "CLUSTER_ID", "ISTIO_META_CLUSTER_ID", "NODE_NAME", "POD_NAME", "POD_NAMESPACE",
	"INSTANCE_IP", "SERVICE_ACCOUNT", "NETWORK", "XDS_ROOT_CA", "CA_ROOT_CA", "ALT_XDS_HOSTNAME", "ALT_CA_HOSTNAME",
	"AUTH_TOKEN", "PROXY_MODE", "PROXY_WORKLOAD_INFO", "INPOD_UDS", "INPOD_PORT_REUSE", "INPOD_ENABLED",
	"LOCAL_XDS_PATH", "SECRET_TTL", "TERMINATION_GRACE_PERIOD_SECONDS", "CONNECTION_TERMINATION_DEADLINE",
	"POOL_MAX_STREAMS_PER_CONNECTION", "POOL_UNUSED_RELEASE_TIMEOUT", "RUST_LOG", "KUBERNETES_SERVICE_HOST",
	"CLUSTER_DOMAIN", "PACKET_MARK", "XDS_ON_DEMAND", "FAKE_CA", "ENABLE_PROXY",
	// prefixes
	"ISTIO_META_*", "ISTIO_METAJSON_*", "XDS_HEADER_*", "CA_HEADER_*",
}

// envIgnored are ztunnel's variables Ambit does not act on (yet): when
// set, they are logged once at start, by name, with why.
var envIgnored = map[string]string{
	"KEEPALIVE_ENABLED":            "TCP keepalive on pods' sockets is not set by Ambit",
	"KEEPALIVE_TIME":               "TCP keepalive on pods' sockets is not set by Ambit",
	"KEEPALIVE_INTERVAL":           "TCP keepalive on pods' sockets is not set by Ambit",
	"KEEPALIVE_RETRIES":            "TCP keepalive on pods' sockets is not set by Ambit",
	"USER_TIMEOUT_ENABLED":         "TCP_USER_TIMEOUT is not set by Ambit",
	"ENABLE_ORIG_SRC":              "Ambit always connects to apps from the client's address",
	"PROXY_CONFIG":                 "mesh ProxyConfig is not read; set the variables themselves",
	"ISTIO_META_DNS_CAPTURE":       "the DNS proxy is not built yet (issue 18); sent as node metadata only",
	"ISTIO_META_DNS_PROXY_ADDR":    "the DNS proxy is not built yet (issue 18); sent as node metadata only",
	"IPV6_ENABLED":                 "dual-stack is not built yet (issue 18)",
	"HTTP2_STREAM_WINDOW_SIZE":     "HBONE windows are Ambit's (4 MiB stream, 16 MiB connection)",
	"HTTP2_CONNECTION_WINDOW_SIZE": "HBONE windows are Ambit's (4 MiB stream, 16 MiB connection)",
	"HTTP2_FRAME_SIZE":             "HBONE frame size is Ambit's (1 MiB)",
	"ZTUNNEL_WORKER_THREADS":       "Go schedules on GOMAXPROCS, which follows the container's CPU limit",
	"ZTUNNEL_CPU_LIMIT":            "Go schedules on GOMAXPROCS, which follows the container's CPU limit",
	"ZTUNNEL_RESOURCE_CPU_LIMIT":   "Go schedules on GOMAXPROCS, which follows the container's CPU limit",
	"ZTUNNEL_RESOURCE_CPU_REQUEST": "Go schedules on GOMAXPROCS, which follows the container's CPU limit",
	"UNSTABLE_ENABLE_SOCKS5":       "Ambit serves SOCKS5 on the node's loopback (15080) always",
	"PREFERED_SERVICE_NAMESPACE":   "service lookup by hostname prefers no namespace",
	"LOCALHOST_APP_TUNNEL":         "application tunnels are not built yet",
	"ENABLE_RESPONSE_BAGGAGE":      "baggage is read, not answered",
	"RUST_BACKTRACE":               "a Rust setting",
}

// envRefused are variables whose value, when set, asks for what Ambit
// cannot do safely: start-up fails naming them (fail closed).
var envRefused = []string{"LOCAL_XDS", "CRL_PATH"}

// Env is what ztunnel's environment makes of a proxy: its options, the
// log level from RUST_LOG, and the variables set that Ambit ignores.
type Env struct {
	Options  Options
	LogLevel string   // from RUST_LOG's default level; "" when unset
	Ignored  []string // "NAME: why", sorted; for one log line at start
}

// FromEnv builds a proxy's options from ztunnel's environment (environ is
// os.Environ()'s form). fileExists decides ztunnel's defaults that apply
// only when their file is there (nil: os.Stat). Every error names the
// variable and the value that is wrong.
func FromEnv(environ []string, fileExists func(string) bool) (Env, error) {
	if fileExists == nil {
		fileExists = func(p string) bool { _, err := os.Stat(p); return err == nil }
	}
	env := envMap(environ)
	var errs []error
	bad := func(name, why string) { errs = append(errs, fmt.Errorf("%s=%q: %s", name, env[name], why)) }
	var out Env
	o := &out.Options

	self, err := SelfFromEnv(environ)
	if err != nil {
		errs = append(errs, err)
	}
	o.Self = self

	switch mode := env["PROXY_MODE"]; mode {
	case "", "shared":
		o.Node = env["NODE_NAME"]
		if o.Node == "" {
			errs = append(errs, errors.New("NODE_NAME is not set: a shared proxy serves the pods of one node (the chart sets it from spec.nodeName)"))
		}
		o.ZDSSocket = envOr(env, "INPOD_UDS", DefaultInpodUDS)
	case "dedicated":
		parts := strings.Split(env["PROXY_WORKLOAD_INFO"], "/")
		if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
			bad("PROXY_WORKLOAD_INFO", "PROXY_MODE=dedicated needs namespace/name/service-account")
		} else {
			o.Workload = parts[0] + "/" + parts[1]
			if o.Self.ServiceAccount == "" {
				o.Self.ServiceAccount = parts[2]
			}
		}
	default:
		bad("PROXY_MODE", "want shared or dedicated")
	}

	// Where the mesh comes from: istiod's xDS, or ztunnel's local file, and
	// the CA (always remote here: a CA key has no place in a node proxy).
	def := "localhost:15012"
	if env["KUBERNETES_SERVICE_HOST"] != "" {
		def = ambient.IstiodServerName + ":15012"
	}
	cp := &ControlPlane{
		XDSServerName: env["ALT_XDS_HOSTNAME"], CAServerName: env["ALT_CA_HOSTNAME"],
		XDSHeaders: headers(env, "XDS_HEADER_", &errs), CAHeaders: headers(env, "CA_HEADER_", &errs),
	}
	if cp.XDSAddress, err = grpcTarget("XDS_ADDRESS", envOr(env, "XDS_ADDRESS", def)); err != nil {
		errs = append(errs, err)
	}
	if cp.CAAddress, err = grpcTarget("CA_ADDRESS", envOr(env, "CA_ADDRESS", def)); err != nil {
		errs = append(errs, err)
	}
	cp.RootCert = envOr(env, "XDS_ROOT_CA", DefaultRootCertFile)
	cp.CARootCert = envOr(env, "CA_ROOT_CA", DefaultRootCertFile)
	if tok, ok := env["AUTH_TOKEN"]; ok && tok != "" {
		cp.TokenFile = tok
	} else if fileExists(DefaultTokenFile) {
		cp.TokenFile = DefaultTokenFile // ztunnel: the default only if it is there
	}
	if path := env["LOCAL_XDS_PATH"]; path != "" {
		o.Local = &Local{ConfigFile: path} // with the remote CA, as ztunnel runs it
		cp.XDSAddress = ""
	}
	o.ControlPlane = cp

	durationVar := func(name string, dst *time.Duration) {
		if v, ok := env[name]; ok && v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				bad(name, "want a positive duration such as 24h or 5m")
				return
			}
			*dst = d
		}
	}
	durationVar("SECRET_TTL", &o.CertTTL)
	durationVar("POOL_UNUSED_RELEASE_TIMEOUT", &o.HBONE.IdleTimeout)
	if v := env["TERMINATION_GRACE_PERIOD_SECONDS"]; v != "" {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n == 0 {
			bad("TERMINATION_GRACE_PERIOD_SECONDS", "want whole seconds above zero")
		} else {
			// ztunnel's rule: drain for less than Kubernetes waits, so the
			// last seconds close what is left before SIGKILL would.
			secs := n - 1
			if n > 10 {
				secs = n - 5
			}
			o.DrainTimeout = time.Duration(max(secs, 1)) * time.Second
		}
	}
	durationVar("CONNECTION_TERMINATION_DEADLINE", &o.DrainTimeout)
	if v := env["POOL_MAX_STREAMS_PER_CONNECTION"]; v != "" {
		n, err := strconv.ParseUint(v, 10, 16)
		if err != nil || n == 0 {
			bad("POOL_MAX_STREAMS_PER_CONNECTION", "want a number of streams from 1 to 65535")
		} else {
			o.PoolMaxStreams = uint32(n)
		}
	}
	o.PortReuse = true
	if v, ok := env["INPOD_PORT_REUSE"]; ok && v != "" {
		if o.PortReuse, err = strconv.ParseBool(v); err != nil {
			bad("INPOD_PORT_REUSE", "want true or false")
		}
	}
	if v := env["NETWORK"]; v != "" {
		o.Network = v
	}
	// Settings Ambit has one answer to: the default is accepted, another
	// value refused rather than silently not honoured.
	only := func(name, want, why string) {
		if v, ok := env[name]; ok && v != "" && !strings.EqualFold(v, want) {
			bad(name, why)
		}
	}
	only("INPOD_ENABLED", "true", "Ambit's shared mode is in-pod only, as ztunnel's is")
	only("PACKET_MARK", strconv.Itoa(ambient.InpodMark), "Ambit marks its sockets 1337 (0x539), as istio-cni expects")
	only("XDS_ON_DEMAND", "false", "on-demand xDS is not supported: Ambit subscribes to everything")
	only("FAKE_CA", "false", "a fake CA is not supported: certificates come from the CA at CA_ADDRESS")
	only("ENABLE_PROXY", "true", "a node proxy that does not proxy is not supported")
	if v := env["CLUSTER_DOMAIN"]; v != "" && v != "cluster.local" {
		out.Ignored = append(out.Ignored, "CLUSTER_DOMAIN: names are not served yet (issue 18), so only cluster.local is meant")
	}
	for _, name := range envRefused {
		if env[name] != "" {
			switch name {
			case "LOCAL_XDS":
				bad(name, "inline local config is not supported; write it to a file and set LOCAL_XDS_PATH")
			case "CRL_PATH":
				bad(name, "certificate revocation lists are not checked by Ambit; refusing rather than ignoring them")
			}
		}
	}
	if v := env["RUST_LOG"]; v != "" {
		out.LogLevel = rustLogLevel(v)
	}
	for name, why := range envIgnored {
		if _, ok := env[name]; ok {
			out.Ignored = append(out.Ignored, name+": "+why)
		}
	}
	sort.Strings(out.Ignored)
	if len(errs) > 0 {
		return out, fmt.Errorf("ztunnel environment: %w", errors.Join(errs...))
	}
	return out, nil
}

func envOr(env map[string]string, name, def string) string {
	if v := env[name]; v != "" {
		return v
	}
	return def
}

// grpcTarget turns ztunnel's address (https://host:port, or host:port)
// into gRPC's target; plaintext is refused: the token would travel in clear.
func grpcTarget(name, v string) (string, error) {
	rest, scheme, found := v, "", false
	if i := strings.Index(v, "://"); i >= 0 {
		scheme, rest, found = v[:i], v[i+3:], true
	}
	if found && scheme != "https" {
		return "", fmt.Errorf("%s=%q: want https:// (or no scheme): the token must not travel in clear", name, v)
	}
	rest = strings.TrimSuffix(rest, "/")
	if _, port, err := splitHostPort(rest); err != nil || port == "" {
		return "", fmt.Errorf("%s=%q: want host:port", name, v)
	}
	return rest, nil
}

func splitHostPort(s string) (string, string, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().String(), strconv.Itoa(int(ap.Port())), nil
	}
	i := strings.LastIndexByte(s, ':')
	if i <= 0 || strings.ContainsAny(s[:i], "[]:/") {
		return "", "", errors.New("not host:port")
	}
	if _, err := strconv.ParseUint(s[i+1:], 10, 16); err != nil {
		return "", "", err
	}
	return s[:i], s[i+1:], nil
}

// headers collects PREFIX<NAME>=value as gRPC metadata, the name lowercased
// (as ztunnel's header parser does).
func headers(env map[string]string, prefix string, errs *[]error) map[string]string {
	var h map[string]string
	for k, v := range env {
		name, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		name = strings.ToLower(name)
		if name == "" || strings.ContainsFunc(name, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.')
		}) || strings.HasPrefix(name, "grpc-") || name == "authorization" {
			*errs = append(*errs, fmt.Errorf("%s: not a header name Ambit will send", k))
			continue
		}
		if strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r > 0x7e }) {
			*errs = append(*errs, fmt.Errorf("%s: the value holds characters a header cannot carry", k))
			continue
		}
		if h == nil {
			h = map[string]string{}
		}
		h[name] = v
	}
	return h
}

// rustLogLevel is the default level of a RUST_LOG filter ("info",
// "info,ztunnel::proxy=debug"): Ambit has one level.
func rustLogLevel(v string) string {
	for part := range strings.SplitSeq(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" || strings.Contains(part, "=") {
			continue
		}
		switch strings.ToLower(part) {
		case "trace", "debug":
			return "debug"
		case "info":
			return "info"
		case "warn":
			return "warn"
		case "error", "off":
			return "error"
		}
	}
	return ""
}
