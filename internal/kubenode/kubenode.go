// Package kubenode is the node agent's Kubernetes side (istio-cni's node
// agent): it watches the pods of its own node, enrolls the mesh's pods
// through internal/nodeagent (capture in the pod's namespace, the pod
// handed to the proxy over ZDS) and writes the annotation
// ambient.istio.io/redirection on each, so the control plane serves it as
// HBONE. New pods come through the ambit-cni plugin it chains into the
// node's CNI configuration (their ADD waits for the enrollment); pods
// that were running before, or that join the mesh later by a label, are
// found through /proc. A pod leaving the mesh or the node is unenrolled.
// Uninstalled (its DaemonSet gone), it takes the plugin out and every pod
// out of the mesh; restarted, it leaves them as they are.
package kubenode

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/cni"
	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/nodeagent"
	"istio.io/istio/pkg/zdsapi"
)

// Options configure the agent on one node.
type Options struct {
	Node      string // the node's name (NODE_NAME, from the downward API)
	ClusterID string // the workload uids' prefix, as the control plane's --cluster-id; default "Kubernetes"
	// PodNamespace and PodName are the agent's own pod: its DaemonSet's
	// fate tells an uninstall from a restart.
	PodNamespace, PodName string
	CNI                   cni.Installation
	// Socket is where the plugin reaches the agent (cni.DefaultAgentSocket).
	Socket string
	// StateDir holds the token (bound to the node) and the API server's CA
	// the plugin uses when the agent does not answer (a host path:
	// /var/run/ambit).
	StateDir string
	// CAFile is the API server's CA, copied into StateDir.
	CAFile string
	// ProcDir is the host's /proc (the pod has the host's PID namespace),
	// NetnsDir the runtime's pinned network namespaces (/var/run/netns).
	ProcDir, NetnsDir string
	Log               *slog.Logger
	// Ready is called once the informers are synced, the plugin installed
	// and the running pods enrolled: the agent may then serve the proxy
	// its snapshot (and the proxy become ready, so no pod is scheduled on a
	// node whose CNI configuration lacks the plugin).
	Ready func()
}

func (o *Options) fill() {
	if o.ClusterID == "" {
		o.ClusterID = "Kubernetes"
	}
	if o.Socket == "" {
		o.Socket = cni.DefaultAgentSocket
	}
	if o.StateDir == "" {
		o.StateDir = filepath.Dir(o.Socket)
	}
	if o.ProcDir == "" {
		o.ProcDir = "/proc"
	}
	if o.NetnsDir == "" {
		o.NetnsDir = "/var/run/netns"
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	// The agent's own namespace is never enrolled, and the plugin never
	// asks about it: the agent's pod must start while no agent runs.
	if ns := o.PodNamespace; ns != "" && !slices.Contains(o.CNI.Conf.ExcludeNamespaces, ns) {
		o.CNI.Conf.ExcludeNamespaces = append(slices.Clone(o.CNI.Conf.ExcludeNamespaces), ns)
	}
}

// Node is the agent on one node.
type Node struct {
	opts   Options
	client *kube.Client
	agent  *nodeagent.Agent
	server string // the API server's URL, for the plugin

	pods       kube.Informer[kube.Pod, *kube.Pod]
	namespaces kube.Informer[kube.Namespace, *kube.Namespace]
	changed    chan struct{}
	ownerGone  chan struct{} // poked when the DaemonSet's copy changes
	// The agent's own DaemonSet, watched from the start: at SIGTERM of an
	// uninstall, helm has deleted the agent's RBAC too, so the answer must
	// already be in hand (the watch sees the DaemonSet's deletion first).
	daemonSet   kube.Informer[kube.DaemonSet, *kube.DaemonSet]
	ownerKey    string // namespace/name of the DaemonSet; "" if none
	ownerUID    string
	account     string    // the agent\'s service account (its pod\'s)
	tokenExpiry time.Time // of the plugin\'s token (Run\'s goroutine only)

	mu       sync.Mutex        // serializes enrollments; guards enrolled
	enrolled map[string]string // pod key (ns/name) → workload uid

	uninstalled bool // shutdown has uninstalled (Run's goroutine only)
}

// New makes the agent; Run starts it.
func New(client *kube.Client, server string, agent *nodeagent.Agent, opts Options) (*Node, error) {
	opts.fill()
	if opts.Node == "" {
		return nil, errors.New("kubenode: the node's name is required (NODE_NAME)")
	}
	n := &Node{opts: opts, client: client, agent: agent, server: server, changed: make(chan struct{}, 1), ownerGone: make(chan struct{}, 1), enrolled: map[string]string{}}
	poke := func() {
		select {
		case n.changed <- struct{}{}:
		default:
		}
	}
	skipped := func(kind, key string, err error) {
		opts.Log.Warn("object skipped: it does not decode", "kind", kind, "key", key, "err", err)
	}
	n.pods = kube.Informer[kube.Pod, *kube.Pod]{Client: client, Resource: kube.Pods,
		Selector: kube.Selector{Field: "spec.nodeName=" + opts.Node}, Changed: poke, Skipped: skipped, Log: opts.Log}
	n.namespaces = kube.Informer[kube.Namespace, *kube.Namespace]{Client: client, Resource: kube.Namespaces, Changed: poke, Skipped: skipped, Log: opts.Log}
	return n, nil
}

// Run serves until ctx ends: the informers, the plugin's socket, the
// installation (checked every 10 s: a node's network plugin may rewrite
// its conflist), and a reconcile after every change.
func (n *Node) Run(ctx context.Context) error {
	log := n.opts.Log
	// The informers end with ctx: cancelled first, then waited for (the
	// defers run the other way round), on every return.
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runs := []func(context.Context) error{n.pods.Run, n.namespaces.Run}
	if err := n.findOwner(ctx); err != nil {
		log.Warn("the agent's DaemonSet is not known: a stop will never be taken for an uninstall", "err", err)
	} else {
		runs = append(runs, n.daemonSet.Run)
	}
	for _, run := range runs {
		wg.Add(1)
		go func() { // ends with ctx
			defer wg.Done()
			if err := run(ctx); err != nil && ctx.Err() == nil {
				log.Error("informer ended", "err", err)
			}
		}()
	}
	for _, ch := range []<-chan struct{}{n.pods.Synced(), n.namespaces.Synced()} {
		select {
		case <-ch:
		case <-ctx.Done():
			return nil
		}
	}
	srv, cleanup, err := n.serve()
	if err != nil {
		return err
	}
	defer cleanup()
	defer srv.Close()
	if err := n.install(ctx); err != nil {
		return err
	}
	log.Info("node agent on Kubernetes", "node", n.opts.Node, "cni", n.opts.CNI.ConfDir, "socket", n.opts.Socket)
	n.reconcile(ctx)
	if n.opts.Ready != nil {
		n.opts.Ready()
	}
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			n.shutdown()
			return nil
		case <-n.ownerGone:
			// Uninstalled: act now, while the agent's RBAC may still be
			// there (helm deletes it right after the DaemonSet), and do
			// nothing more until stopped.
			if gone, _ := n.uninstalling(ctx); gone {
				n.shutdown()
				<-ctx.Done()
				return nil
			}
		case <-n.changed:
			n.reconcile(ctx)
		case <-tick.C:
			if err := n.install(ctx); err != nil {
				log.Error("the CNI installation", "err", err)
			}
			n.reconcile(ctx)
		}
	}
}

// findOwner reads the agent's own pod for its DaemonSet and sets up the
// DaemonSet's watch.
func (n *Node) findOwner(ctx context.Context) error {
	if n.opts.PodName == "" || n.opts.PodNamespace == "" {
		return errors.New("the agent's own pod is not known (POD_NAME, POD_NAMESPACE)")
	}
	pod, err := n.client.GetPod(ctx, n.opts.PodNamespace, n.opts.PodName)
	if err != nil {
		return fmt.Errorf("the agent's pod: %w", err)
	}
	n.account = pod.Spec.ServiceAccountName
	for _, o := range pod.Metadata.OwnerReferences {
		if o.Kind == "DaemonSet" {
			n.ownerKey, n.ownerUID = n.opts.PodNamespace+"/"+o.Name, o.UID
			n.daemonSet = kube.Informer[kube.DaemonSet, *kube.DaemonSet]{Client: n.client, Resource: kube.DaemonSets,
				Selector: kube.Selector{Field: "metadata.namespace=" + n.opts.PodNamespace + ",metadata.name=" + o.Name}, Log: n.opts.Log,
				Changed: func() {
					select {
					case n.ownerGone <- struct{}{}:
					default:
					}
				}}
			return nil
		}
	}
	return fmt.Errorf("pod %s/%s has no DaemonSet", n.opts.PodNamespace, n.opts.PodName)
}

// install puts the plugin in place and refreshes the plugin's copies of
// the token and CA.
func (n *Node) install(ctx context.Context) error {
	if err := os.MkdirAll(n.opts.StateDir, 0o700); err != nil {
		return fmt.Errorf("kubenode: %w", err)
	}
	conf := &n.opts.CNI.Conf
	conf.AgentSocket = n.opts.Socket
	if n.server != "" && n.account != "" {
		if err := n.refreshToken(ctx); err != nil {
			// The plugin then fails closed for every pod while the agent is
			// away, mesh or not; said, not fatal.
			n.opts.Log.Warn("no token for the plugin's API fallback", "err", err)
		}
		conf.Kubernetes = &cni.APIAccess{Server: n.server, TokenFile: filepath.Join(n.opts.StateDir, "token")}
		if n.opts.CAFile != "" {
			conf.Kubernetes.CAFile = filepath.Join(n.opts.StateDir, "ca.crt")
			if err := copyIfChanged(n.opts.CAFile, conf.Kubernetes.CAFile); err != nil {
				return err
			}
		}
	}
	file, changed, err := n.opts.CNI.Install()
	if err != nil {
		return fmt.Errorf("kubenode: installing ambit-cni: %w", err)
	}
	if changed {
		n.opts.Log.Info("ambit-cni installed", "conflist", file, "binary", filepath.Join(n.opts.CNI.BinDir, cni.PluginType))
	}
	return nil
}

// refreshToken keeps the plugin's token (StateDir/token) valid: a token of
// the agent's account bound to the Node, not to the agent's pod (a
// pod-bound token dies with the pod, just when the plugin needs it: while
// the agent's pod is replaced). Renewed at half its hour.
func (n *Node) refreshToken(ctx context.Context) error {
	if time.Until(n.tokenExpiry) > 30*time.Minute {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var node kube.Node
	if err := n.client.Get(ctx, kube.Nodes, "", n.opts.Node, &node); err != nil {
		return fmt.Errorf("node %s: %w", n.opts.Node, err)
	}
	token, exp, err := n.client.RequestToken(ctx, n.opts.PodNamespace, n.account, n.opts.Node, node.Metadata.UID, time.Hour)
	if err != nil {
		return err
	}
	if err := writeFile(filepath.Join(n.opts.StateDir, "token"), []byte(token)); err != nil {
		return err
	}
	n.tokenExpiry = exp
	return nil
}

func copyIfChanged(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("kubenode: %w", err)
	}
	if cur, err := os.ReadFile(dst); err == nil && string(cur) == string(data) {
		return nil
	}
	return writeFile(dst, data)
}

// writeFile replaces dst with data (mode 0600), atomically.
func writeFile(dst string, data []byte) error {
	tmp := dst + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("kubenode: %w", err)
	}
	return os.Rename(tmp, dst)
}

// serve answers the plugin on its socket.
func (n *Node) serve() (*http.Server, func(), error) {
	l, cleanup, err := nodeagent.ListenSocket("unix", n.opts.Socket)
	if err != nil {
		return nil, nil, fmt.Errorf("kubenode: the plugin's socket: %w", err)
	}
	if err := os.Chmod(n.opts.Socket, 0o600); err != nil {
		l.Close()
		cleanup()
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /add", n.handle(n.cniAdd))
	mux.HandleFunc("POST /del", n.handle(n.cniDel))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }() // ends when Run closes srv
	return srv, cleanup, nil
}

func (n *Node) handle(f func(context.Context, *cni.Event) (int, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var ev cni.Event
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
		if err := dec.Decode(&ev); err != nil {
			http.Error(w, "kubenode: the plugin's event: "+err.Error(), http.StatusBadRequest)
			return
		}
		if ev.PodName == "" || ev.PodNamespace == "" {
			http.Error(w, "kubenode: the plugin's event names no pod", http.StatusBadRequest)
			return
		}
		status, err := f(r.Context(), &ev)
		if err != nil {
			n.opts.Log.Warn("CNI event failed", "pod", ev.PodNamespace+"/"+ev.PodName, "err", err)
			http.Error(w, err.Error(), status)
			return
		}
		w.WriteHeader(status)
	}
}

// cniAdd enrolls a new pod during its ADD, before it runs.
func (n *Node) cniAdd(ctx context.Context, ev *cni.Event) (int, error) {
	pod, ns, err := n.lookup(ctx, ev.PodNamespace, ev.PodName, ev.PodUID)
	if err != nil {
		return http.StatusServiceUnavailable, err
	}
	if !n.wanted(pod, ns) {
		return cni.StatusNotMesh, nil
	}
	if ev.Netns == "" {
		return http.StatusBadRequest, fmt.Errorf("pod %s: the ADD has no network namespace", pod.Metadata.Key())
	}
	if err := n.enroll(ctx, pod, ev.Netns); err != nil {
		return http.StatusInternalServerError, err
	}
	return cni.StatusEnrolled, nil
}

// cniDel unenrolls a pod whose sandbox goes.
func (n *Node) cniDel(ctx context.Context, ev *cni.Event) (int, error) {
	n.unenroll(ctx, ev.PodNamespace+"/"+ev.PodName, false)
	return http.StatusOK, nil
}

// lookup finds the pod and its namespace: in the informers, or (the
// pod is new, the watch may lag) from the API server.
func (n *Node) lookup(ctx context.Context, ns, name, uid string) (*kube.Pod, *kube.Namespace, error) {
	pod := n.pods.Get(ns + "/" + name)
	if pod == nil || (uid != "" && pod.Metadata.UID != uid) {
		var err error
		if pod, err = n.client.GetPod(ctx, ns, name); err != nil {
			return nil, nil, fmt.Errorf("pod %s/%s: %w", ns, name, err)
		}
	}
	nsObj := n.namespaces.Get(ns)
	if nsObj == nil {
		nsObj = &kube.Namespace{}
		if err := n.client.Get(ctx, kube.Namespaces, "", ns, nsObj); err != nil {
			return nil, nil, fmt.Errorf("namespace %s: %w", ns, err)
		}
	}
	return pod, nsObj, nil
}

// wanted: the pod belongs in the mesh and on this node's capture.
func (n *Node) wanted(pod *kube.Pod, ns *kube.Namespace) bool {
	if pod.Spec.HostNetwork || pod.Metadata.DeletionTimestamp != nil {
		return false
	}
	if slices.Contains(n.opts.CNI.Conf.ExcludeNamespaces, pod.Metadata.Namespace) {
		return false
	}
	var nsLabels map[string]string
	if ns != nil {
		nsLabels = ns.Metadata.Labels
	}
	return ambient.InMesh(nsLabels, pod.Metadata.Labels)
}

// enroll captures the pod, hands it to the proxy and annotates it; any
// failure rolls back what was done (the pod is never half-enrolled).
func (n *Node) enroll(ctx context.Context, pod *kube.Pod, netnsPath string) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	key := pod.Metadata.Key()
	uid := ambient.PodWorkloadUID(n.opts.ClusterID, pod.Metadata.Namespace, pod.Metadata.Name)
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	if old, ok := n.enrolled[key]; ok {
		_ = n.agent.Unenroll(old) // a new sandbox for the same pod: the old namespace is gone
		delete(n.enrolled, key)
	}
	err := n.agent.Enroll(nodeagent.Pod{UID: uid, NSPath: netnsPath, Info: &zdsapi.WorkloadInfo{
		Name: pod.Metadata.Name, Namespace: pod.Metadata.Namespace, ServiceAccount: sa}})
	if err != nil {
		return fmt.Errorf("pod %s: %w", key, err)
	}
	enabled := "enabled"
	if err := n.client.AnnotatePod(ctx, pod.Metadata.Namespace, pod.Metadata.Name, map[string]*string{ambient.RedirectionAnnotation: &enabled}); err != nil {
		_ = n.agent.Unenroll(uid)
		return fmt.Errorf("pod %s: the %s annotation: %w (enrollment rolled back)", key, ambient.RedirectionAnnotation, err)
	}
	n.enrolled[key] = uid
	n.opts.Log.Info("pod in the mesh", "pod", key, "netns", netnsPath)
	return nil
}

// unenroll takes the pod out (if it is in); with annotate, its
// annotation goes too (the pod stays, outside the mesh).
func (n *Node) unenroll(ctx context.Context, key string, annotate bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	uid, ok := n.enrolled[key]
	if !ok {
		return
	}
	delete(n.enrolled, key)
	if err := n.agent.Unenroll(uid); err != nil {
		n.opts.Log.Warn("unenroll", "pod", key, "err", err)
	}
	if annotate {
		ns, name, _ := strings.Cut(key, "/")
		if err := n.client.AnnotatePod(ctx, ns, name, map[string]*string{ambient.RedirectionAnnotation: nil}); err != nil && !kube.IsNotFound(err) {
			n.opts.Log.Warn("removing the redirection annotation", "pod", key, "err", err)
		}
	}
	n.opts.Log.Info("pod out of the mesh", "pod", key)
}

// reconcile makes the enrolled set what the informers say: running mesh
// pods in (found through /proc: they started before the agent, or joined
// the mesh by a label), the rest out.
func (n *Node) reconcile(ctx context.Context) {
	want := map[string]*kube.Pod{}
	for _, pod := range n.pods.List() {
		if pod.Status.PodIP == "" || pod.Status.Phase != "Running" {
			continue
		}
		if n.wanted(pod, n.namespaces.Get(pod.Metadata.Namespace)) {
			want[pod.Metadata.Key()] = pod
		}
	}
	n.mu.Lock()
	var gone []string
	for key := range n.enrolled {
		// Enrolled by its ADD, a pod has no IP in the API server yet: it
		// goes only when it is gone or no longer wanted.
		if p := n.pods.Get(key); p == nil || !n.wanted(p, n.namespaces.Get(p.Metadata.Namespace)) {
			gone = append(gone, key)
		}
	}
	var missing []*kube.Pod
	for key, pod := range want {
		if _, ok := n.enrolled[key]; !ok {
			missing = append(missing, pod)
		}
	}
	n.mu.Unlock()
	for _, key := range gone {
		stillThere := n.pods.Get(key) != nil
		n.unenroll(ctx, key, stillThere)
	}
	for _, pod := range missing {
		path, err := findNetns(n.opts.ProcDir, n.opts.NetnsDir, pod.Metadata.UID)
		if err != nil {
			n.opts.Log.Warn("a running mesh pod's network namespace is not found; it stays out of the mesh for now", "pod", pod.Metadata.Key(), "err", err)
			continue
		}
		if err := n.enroll(ctx, pod, path); err != nil {
			n.opts.Log.Warn("enrolling a running pod", "pod", pod.Metadata.Key(), "err", err)
		}
	}
}

// Enrolled lists the enrolled pods' keys.
func (n *Node) Enrolled() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for k := range n.enrolled {
		out = append(out, k)
	}
	return out
}

// shutdown, on the way out: an uninstall (the agent's DaemonSet is gone
// or being deleted) takes every pod out of the mesh and the plugin out of
// the CNI configuration; a restart (the DaemonSet stays) leaves all as
// is, and the proxy goes on serving the pods.
func (n *Node) shutdown() {
	if n.uninstalled {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	uninstall, why := n.uninstalling(ctx)
	if !uninstall {
		n.opts.Log.Info("stopping; pods stay in the mesh", "why", why)
		return
	}
	n.uninstalled = true
	n.opts.Log.Info("uninstalling: pods leave the mesh, ambit-cni leaves the CNI configuration", "why", why)
	// Each pod's capture goes first (its traffic flows direct from then
	// on, whatever the proxy, which is stopping too, does), then the
	// proxy is told, then its annotation goes (an API call that races
	// helm's removal of the agent's RBAC).
	for _, key := range n.Enrolled() {
		n.unenroll(ctx, key, true)
	}
	if err := n.opts.CNI.Uninstall(); err != nil {
		n.opts.Log.Error("removing ambit-cni", "err", err)
	}
	_ = os.Remove(filepath.Join(n.opts.StateDir, "token"))
	_ = os.Remove(filepath.Join(n.opts.StateDir, "ca.crt"))
}

func (n *Node) uninstalling(ctx context.Context) (bool, string) {
	if n.ownerKey == "" {
		return false, "the agent's DaemonSet is not known"
	}
	select {
	case <-n.daemonSet.Synced():
	default:
		return false, "the agent's DaemonSet was never read"
	}
	ds := n.daemonSet.Get(n.ownerKey)
	switch {
	case ds == nil:
		return true, "DaemonSet " + n.ownerKey + " is gone"
	case ds.Metadata.DeletionTimestamp != nil:
		return true, "DaemonSet " + n.ownerKey + " is being deleted"
	case ds.Metadata.UID != n.ownerUID:
		return true, "DaemonSet " + n.ownerKey + " was replaced"
	}
	// The watch may not have told yet (or be down, relisting): ask. A 403
	// is an answer too: the agent's RBAC, part of the same release, is
	// gone, and without it the agent can do nothing for the pods anyway.
	ns, name, _ := strings.Cut(n.ownerKey, "/")
	var got kube.DaemonSet
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := n.client.Get(ctx, kube.DaemonSets, ns, name, &got)
	switch {
	case kube.IsNotFound(err):
		return true, "DaemonSet " + n.ownerKey + " is gone"
	case kube.IsForbidden(err):
		return true, "DaemonSet " + n.ownerKey + " may no longer be read: the agent's RBAC is gone with it"
	case err != nil:
		return false, fmt.Sprintf("DaemonSet %s cannot be read (%v): taken as a restart", n.ownerKey, err)
	case got.Metadata.DeletionTimestamp != nil:
		return true, "DaemonSet " + n.ownerKey + " is being deleted"
	case got.Metadata.UID != n.ownerUID:
		return true, "DaemonSet " + n.ownerKey + " was replaced"
	}
	return false, "DaemonSet " + n.ownerKey + " stays (a restart)"
}
