package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/hbone"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/nsutil"
	"github.com/ambitmesh/ambit/internal/startup"
	"github.com/ambitmesh/ambit/internal/telemetry"
	"github.com/spf13/cobra"
)

// proxyGCPercent is the proxy's default GOGC; see docs/benchmarks.md for
// what it buys (memory with 10,000 idle connections) and costs (CPU).
const proxyGCPercent = 50

// proxyFDTable is the descriptor table the proxy grows at start (capped by
// its RLIMIT_NOFILE): room for ~16,000 relayed connections (two sockets
// each) before the kernel grows it again.
const proxyFDTable = 32768

// proxyFlags are the proxy command's flags, as given.
type proxyFlags struct {
	opts                                   startup.Options
	local                                  startup.Local
	remote                                 startup.ControlPlane
	listenIP, probeIP, logFormat, logLevel string
}

var proxyLong = `Run the node proxy. The config file (ztunnel's local YAML: workloads,
services, policies) is watched: a valid change applies live, an invalid one is
logged and the last good config stays.

--workload NS/NAME dedicates the proxy to one workload and binds every
listener to its IP (run several on 127.0.0.x without root); --node NAME serves
all workloads of a node.

With none of --config, --xds-address, --workload or --node, the proxy
configures itself from ztunnel's environment, as Istio's ztunnel chart sets it
(XDS_ADDRESS, CA_ADDRESS, NODE_NAME, POD_NAME, ...; docs/drop-in.md lists
them all): "ambit proxy ztunnel" is what that chart's DaemonSet runs. In
every mode the proxy is a ztunnel to the control plane: its xDS node id is
ztunnel~INSTANCE_IP~POD_NAME.POD_NAMESPACE~POD_NAMESPACE.svc.cluster.local.

The proxy collects garbage at GOGC=` + fmt.Sprint(proxyGCPercent) + ` unless GOGC is set in its
environment: its hot path allocates ~100 bytes per request, so a tighter heap
costs little CPU and keeps the memory of idle connections down.`

func newProxyCmd() *cobra.Command {
	var pf proxyFlags
	cmd := &cobra.Command{
		Use:   "proxy [ztunnel] [--config FILE --ca-dir DIR | --xds-address ... ] [--workload NS/NAME | --node NAME]",
		Short: "Run the node proxy (from flags, or from ztunnel's environment)",
		Long:  proxyLong,
		Args: func(_ *cobra.Command, args []string) error {
			// ztunnel's chart runs "proxy ztunnel": the role, its only one.
			if len(args) > 1 || len(args) == 1 && args[0] != "ztunnel" {
				return fmt.Errorf("unexpected arguments %q: the only one taken is \"ztunnel\" (ztunnel's role name)", args)
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Getenv("GOGC") == "" {
				debug.SetGCPercent(proxyGCPercent)
			}
			lw := telemetry.NewLogWriter(os.Stderr, 100*time.Millisecond)
			defer lw.Close()
			o, err := pf.options(cmd, lw, os.Environ())
			if err != nil {
				return err
			}
			// Before the first connection: growing the table later stalls
			// every thread opening a descriptor (see nsutil.GrowFDTable).
			if n, err := nsutil.GrowFDTable(proxyFDTable); err != nil {
				o.Log.Warn("descriptor table not grown; bursts of connections may start extra threads", "err", err)
			} else {
				o.Log.Debug("descriptor table grown", "slots", n)
			}
			return startup.Run(cmd.Context(), o)
		},
	}
	pf.register(cmd)
	return cmd
}

// register defines the flags and how they go together.
func (pf *proxyFlags) register(cmd *cobra.Command) {
	f, o := cmd.Flags(), &pf.opts
	f.StringVar(&pf.local.ConfigFile, "config", "", "ztunnel-format local config (YAML), watched for changes (required)")
	f.StringVar(&pf.local.CADir, "ca-dir", "", "CA directory in Istio's plug-in layout (required)")
	f.StringVar(&o.Workload, "workload", "", "dedicated mode: serve this workload (namespace/name) on its own IP")
	f.StringVar(&o.Node, "node", "", "shared mode: serve the workloads of this node")
	f.StringVar(&pf.listenIP, "listen-ip", "", "shared mode: address the listeners bind to (default 127.0.0.1)")
	f.StringVar(&pf.probeIP, "probe-ip", "", "address readiness (15021) and metrics (15020) bind to (default: the admin port's, 127.0.0.1)")
	f.StringVar(&pf.logFormat, "log-format", "text", "log and access-log format: text or json")
	f.StringVar(&pf.logLevel, "log-level", "info", "debug, info, warn or error (changeable at runtime on the admin port)")
	f.DurationVar(&o.CertTTL, "cert-ttl", identity.DefaultCertTTL, "workload certificate lifetime")
	f.StringVar(&o.ZDSSocket, "zds-socket", "", "shared mode: take pods from the node agent on this ZDS socket (in-pod capture)")
	f.BoolVar(&o.PortReuse, "inpod-port-reuse", true, "shared mode: open pod listeners with SO_REUSEPORT, so the proxy replacing this one in an upgrade opens them beside it (ztunnel's INPOD_PORT_REUSE)")
	f.DurationVar(&o.DrainTimeout, "drain-timeout", 5*time.Second, "on SIGTERM, how long live connections get to finish before they are closed (ztunnel: the pod's grace period less 5 s)")
	f.StringVar(&pf.remote.XDSAddress, "xds-address", "", "control plane: delta xDS address (instead of --config)")
	f.StringVar(&pf.remote.CAAddress, "ca-address", "", "control plane: CA address (instead of --ca-dir)")
	f.StringVar(&pf.remote.TokenFile, "token-file", "", "control plane: file holding this node's bearer token")
	f.StringVar(&pf.remote.RootCert, "root-cert", "", "control plane: root certificate(s) to trust it with")
	f.DurationVar(&o.HBONE.ServerIdleTimeout, "hbone-idle-timeout", hbone.DefaultServerIdleTimeout, "close an inbound HBONE connection (GOAWAY) that has carried no stream for this long")
	f.DurationVar(&o.HBONE.PingInterval, "hbone-ping-interval", hbone.DefaultPingInterval, "HTTP/2 keepalive PING period on HBONE connections, both ways")
	f.DurationVar(&o.HBONE.PingTimeout, "hbone-ping-timeout", hbone.DefaultPingTimeout, "close an HBONE connection after this long with nothing read from the peer")
	cmd.MarkFlagsRequiredTogether("config", "ca-dir")
	cmd.MarkFlagsRequiredTogether("xds-address", "ca-address", "token-file", "root-cert")
	cmd.MarkFlagsMutuallyExclusive("config", "xds-address")
	cmd.MarkFlagsMutuallyExclusive("ca-dir", "ca-address")
	cmd.MarkFlagsMutuallyExclusive("workload", "node")
}

// meshFlags are the flags that say what mesh and role the proxy has; with
// none of them set, ztunnel's environment does.
var meshFlags = []string{"config", "ca-dir", "xds-address", "ca-address", "token-file", "root-cert", "workload", "node", "zds-socket"}

// options checks what cobra's flag groups cannot and makes the Options,
// the logger writing to w included: from the flags, or (none of the mesh
// flags set) from ztunnel's environment.
func (pf *proxyFlags) options(cmd *cobra.Command, w *telemetry.LogWriter, environ []string) (startup.Options, error) {
	o, fromEnv, ignored, err := pf.mesh(cmd, environ)
	if err != nil {
		return o, err
	}
	if err := checkHBONETimers(o.HBONE); err != nil {
		return o, err
	}
	if cmd.Flags().Changed("drain-timeout") && o.DrainTimeout <= 0 {
		return o, fmt.Errorf("--drain-timeout %v: want a positive duration (the time live connections get on SIGTERM)", o.DrainTimeout)
	}
	if pf.listenIP != "" {
		ip, err := netip.ParseAddr(pf.listenIP)
		if err != nil {
			return o, fmt.Errorf("--listen-ip: %w", err)
		}
		o.ListenIP = ip
	}
	if pf.probeIP != "" {
		ip, err := netip.ParseAddr(pf.probeIP)
		if err != nil {
			return o, fmt.Errorf("--probe-ip: %w", err)
		}
		o.ProbeIP = ip
	}
	o.LogLevel = new(slog.LevelVar)
	if err := o.LogLevel.UnmarshalText([]byte(strings.ToUpper(pf.logLevel))); err != nil {
		return o, fmt.Errorf("--log-level %q: want debug, info, warn or error", pf.logLevel)
	}
	// Buffered (flushed within 100 ms), so a burst of access-log records
	// does not queue on the handler's lock a syscall at a time.
	hopts := &slog.HandlerOptions{Level: o.LogLevel}
	switch pf.logFormat {
	case "text":
		o.Log = slog.New(slog.NewTextHandler(w, hopts))
	case "json":
		o.Log = slog.New(slog.NewJSONHandler(w, hopts))
	default:
		return o, fmt.Errorf("--log-format %q: want text or json", pf.logFormat)
	}
	if fromEnv {
		o.Log.Info("configured from ztunnel's environment", "mode", map[bool]string{true: "shared", false: "dedicated"}[o.Node != ""], "node", o.Node, "workload", o.Workload)
	}
	if len(ignored) > 0 {
		o.Log.Warn("environment variables Ambit does not act on", "ignored", ignored)
	}
	o.Version = version
	return o, o.Validate()
}

// mesh makes the Options' mesh and role: from the flags, or (none of the
// mesh flags set) from ztunnel's environment, whose ignored variables it
// returns for the log.
func (pf *proxyFlags) mesh(cmd *cobra.Command, environ []string) (o startup.Options, fromEnv bool, ignored []string, err error) {
	fromEnv = true
	for _, name := range meshFlags {
		if cmd.Flags().Changed(name) {
			fromEnv = false
		}
	}
	if fromEnv {
		env, err := startup.FromEnv(environ, nil)
		if err != nil {
			return o, true, nil, err
		}
		o = env.Options
		if env.LogLevel != "" && !cmd.Flags().Changed("log-level") {
			pf.logLevel = env.LogLevel
		}
		// The kubelet probes readiness on the pod's address, and
		// Prometheus scrapes it there: ztunnel binds both to every address.
		if pf.probeIP == "" {
			o.ProbeIP = netip.IPv4Unspecified()
		}
		o.HBONE = mergeHBONE(pf.opts.HBONE, o.HBONE)
		return o, true, env.Ignored, nil
	}
	o = pf.opts
	if pf.local.ConfigFile == "" && pf.remote.XDSAddress == "" {
		return o, false, nil, errors.New("set one mesh: --config and --ca-dir, or a control plane (--xds-address, --ca-address, --token-file, --root-cert); or none of the mesh flags, to run from ztunnel's environment (docs/drop-in.md)")
	}
	if pf.local.ConfigFile != "" {
		o.Local = &pf.local
	} else {
		o.ControlPlane = &pf.remote
	}
	o.Self, err = startup.SelfFromEnv(environ)
	return o, false, nil, err
}

// mergeHBONE keeps the environment's HBONE settings and takes the rest
// from the flags (their defaults included).
func mergeHBONE(flags, env hbone.Config) hbone.Config {
	if env.IdleTimeout != 0 {
		flags.IdleTimeout = env.IdleTimeout
	}
	return flags
}

// checkHBONETimers refuses timer flags that cannot work.
func checkHBONETimers(c hbone.Config) error {
	for _, d := range []struct {
		flag string
		v    time.Duration
	}{{"--hbone-idle-timeout", c.ServerIdleTimeout}, {"--hbone-ping-interval", c.PingInterval}, {"--hbone-ping-timeout", c.PingTimeout}} {
		if d.v <= 0 {
			return fmt.Errorf("%s %v: want a duration above zero", d.flag, d.v)
		}
	}
	if c.PingTimeout <= c.PingInterval {
		return fmt.Errorf("--hbone-ping-timeout %v must be longer than --hbone-ping-interval %v: a peer needs a PING to answer", c.PingTimeout, c.PingInterval)
	}
	return nil
}
