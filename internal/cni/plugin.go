// Package cni is ambit-cni, the CNI plugin the node agent chains into the
// node's network configuration (istio-cni's role): on a pod's ADD,
// after the node's own plugin has given the pod its address, it asks the
// agent to enroll the pod; on DEL, to let it go. The plugin decides
// nothing about the mesh itself while the agent answers: the agent has
// the pod and namespace informers. When the agent does not answer, the
// plugin asks the API server whether the pod belongs in the mesh, and
// fails the ADD only for a pod that does (fail closed: a mesh pod never
// starts un-captured), so pods outside the mesh still start while the
// agent restarts.
//
// The plugin is the ambit binary run under the name ambit-cni (the agent
// copies itself into the CNI binary directory): one binary to ship.
package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// PluginType is the plugin's name: its "type" in the conflist and its
// binary's name.
const PluginType = "ambit-cni"

// DefaultAgentSocket is where the agent listens for the plugin, on the
// node (the DaemonSet mounts /var/run/ambit from the host).
const DefaultAgentSocket = "/var/run/ambit/cni.sock"

// Conf is the plugin's entry in the node's conflist.
type Conf struct {
	types.PluginConf
	// AgentSocket is the agent's Unix socket (default DefaultAgentSocket).
	AgentSocket string `json:"agentSocket,omitempty"`
	// ExcludeNamespaces are never enrolled and never asked about: the
	// agent's own (its pod must start while no agent runs) and
	// kube-system.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// Kubernetes is how to reach the API server when the agent does not
	// answer; the agent keeps the token file current.
	Kubernetes *APIAccess `json:"kubernetes,omitempty"`
	// FailOpen lets a mesh pod the agent cannot enroll start un-meshed
	// (logged) instead of failing its ADD. Off by default: fail closed, as
	// istio-cni does.
	FailOpen bool `json:"failOpen,omitempty"`
}

// APIAccess is the API server's address, its CA and a token, as files on
// the node.
type APIAccess struct {
	Server    string `json:"server"`
	CAFile    string `json:"caFile"`
	TokenFile string `json:"tokenFile"`
}

// Event is what the plugin sends the agent: POST /add or /del on the
// agent's socket, as JSON.
type Event struct {
	ContainerID  string   `json:"containerID"`
	Netns        string   `json:"netns"`
	IfName       string   `json:"ifName"`
	PodName      string   `json:"podName"`
	PodNamespace string   `json:"podNamespace"`
	PodUID       string   `json:"podUID,omitempty"`
	IPs          []string `json:"ips,omitempty"` // from the previous plugin's result
}

// The agent's answers to an add: enrolled, or not a mesh pod (both let the
// pod start); anything else is an error whose body says why.
const (
	StatusEnrolled = http.StatusOK
	StatusNotMesh  = http.StatusNoContent
)

// k8sArgs are the CNI_ARGS the kubelet's runtime passes.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive // CNI_ARGS names
	K8S_POD_NAMESPACE          types.UnmarshallableString
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString
	K8S_POD_UID                types.UnmarshallableString
}

// Main runs the plugin: the CNI protocol on environment, stdin and stdout.
func Main() {
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck}, version.All, "ambit-cni: enrolls pods in Ambit's mesh")
}

func parse(args *skel.CmdArgs) (*Conf, *Event, error) {
	var conf Conf
	if err := json.Unmarshal(args.StdinData, &conf); err != nil {
		return nil, nil, fmt.Errorf("ambit-cni: the network configuration: %w", err)
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = DefaultAgentSocket
	}
	var ka k8sArgs
	if err := types.LoadArgs(args.Args, &ka); err != nil {
		return nil, nil, fmt.Errorf("ambit-cni: CNI_ARGS: %w", err)
	}
	ev := &Event{
		ContainerID: args.ContainerID, Netns: args.Netns, IfName: args.IfName,
		PodName: string(ka.K8S_POD_NAME), PodNamespace: string(ka.K8S_POD_NAMESPACE), PodUID: string(ka.K8S_POD_UID),
	}
	return &conf, ev, nil
}

// prevResult is the chain's result so far, which a chained plugin must
// pass on (converted to its own version).
func prevResult(conf *Conf) (*current.Result, error) {
	if conf.RawPrevResult == nil {
		return nil, errors.New("ambit-cni: no prevResult: it must be chained after the node's network plugin, not first")
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, fmt.Errorf("ambit-cni: prevResult: %w", err)
	}
	res, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, fmt.Errorf("ambit-cni: prevResult: %w", err)
	}
	return res, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, ev, err := parse(args)
	if err != nil {
		return err
	}
	res, err := prevResult(conf)
	if err != nil {
		return err
	}
	if err := addOrFailOpen(context.Background(), conf, ev, res, os.Stderr); err != nil {
		return err
	}
	return types.PrintResult(res, conf.CNIVersion)
}

// addOrFailOpen is add, with the configuration's failure policy: closed
// (the error fails the ADD), or open (said on log, the pod starts
// un-meshed). Nothing is half done either way: the agent rolls back what
// it did before it answers with an error.
func addOrFailOpen(ctx context.Context, conf *Conf, ev *Event, res *current.Result, log io.Writer) error {
	err := add(ctx, conf, ev, res)
	if err != nil && conf.FailOpen {
		fmt.Fprintf(log, "%v; the pod starts OUTSIDE the mesh (failOpen)\n", err)
		return nil
	}
	return err
}

// add enrolls the pod, or decides it needs no enrolling.
func add(ctx context.Context, conf *Conf, ev *Event, res *current.Result) error {
	if ev.PodName == "" || ev.PodNamespace == "" {
		return nil // not a Kubernetes pod: nothing of the mesh's
	}
	if slices.Contains(conf.ExcludeNamespaces, ev.PodNamespace) {
		return nil
	}
	for _, ip := range res.IPs {
		ev.IPs = append(ev.IPs, ip.Address.IP.String())
	}
	status, body, err := post(ctx, conf.AgentSocket, "/add", ev, 2*time.Minute)
	switch {
	case err == nil && (status == StatusEnrolled || status == StatusNotMesh):
		return nil
	case err == nil:
		return fmt.Errorf("ambit-cni: pod %s/%s: the node agent refused to enroll it: %s", ev.PodNamespace, ev.PodName, body)
	}
	// The agent is not there (restarting, say). A pod outside the mesh
	// starts anyway; a mesh pod, or one we cannot judge, does not.
	inMesh, lerr := lookup(ctx, conf.Kubernetes, ev)
	if lerr == nil && !inMesh {
		return nil
	}
	if lerr != nil {
		return fmt.Errorf("ambit-cni: pod %s/%s: the node agent does not answer (%v), and whether the pod is in the mesh is unknown (%v): failing closed", ev.PodNamespace, ev.PodName, err, lerr)
	}
	return fmt.Errorf("ambit-cni: pod %s/%s is in the mesh and the node agent does not answer (%v): failing closed, the kubelet will retry", ev.PodNamespace, ev.PodName, err)
}

// lookup asks the API server whether the pod belongs in the mesh.
func lookup(ctx context.Context, api *APIAccess, ev *Event) (bool, error) {
	if api == nil || api.Server == "" {
		return false, errors.New("no API server in the plugin's configuration")
	}
	cfg := &kube.Config{Server: api.Server, TokenFile: api.TokenFile, Source: "ambit-cni's configuration"}
	if api.CAFile != "" {
		roots, err := kube.LoadRoots(api.CAFile)
		if err != nil {
			return false, err
		}
		cfg.Roots = roots
	}
	c, err := kube.New(cfg)
	if err != nil {
		return false, err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	pod, err := c.GetPod(ctx, ev.PodNamespace, ev.PodName)
	if err != nil {
		return false, err
	}
	var ns kube.Namespace
	if err := c.Get(ctx, kube.Namespaces, "", ev.PodNamespace, &ns); err != nil {
		return false, err
	}
	return !pod.Spec.HostNetwork && ambient.InMesh(ns.Metadata.Labels, pod.Metadata.Labels), nil
}

func cmdDel(args *skel.CmdArgs) error {
	conf, ev, err := parse(args)
	if err != nil {
		return err
	}
	if ev.PodName == "" || slices.Contains(conf.ExcludeNamespaces, ev.PodNamespace) {
		return nil
	}
	// DEL must succeed whenever it can: the runtime retries a failed DEL
	// and the pod's teardown waits. An agent that does not answer
	// unenrolls the pod itself when its informer sees it go.
	status, body, err := post(context.Background(), conf.AgentSocket, "/del", ev, 30*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ambit-cni: pod %s/%s: DEL: the node agent does not answer: %v\n", ev.PodNamespace, ev.PodName, err)
		return nil
	}
	if status != http.StatusOK {
		fmt.Fprintf(os.Stderr, "ambit-cni: pod %s/%s: DEL: the node agent: %s\n", ev.PodNamespace, ev.PodName, body)
	}
	return nil
}

// cmdCheck has nothing to verify the agent does not keep true itself.
func cmdCheck(args *skel.CmdArgs) error {
	_, _, err := parse(args)
	return err
}

// post sends ev to the agent and returns its status and body; err is set
// only when the agent could not be reached or did not answer.
func post(ctx context.Context, socket, path string, ev *Event, timeout time.Duration) (int, string, error) {
	body, err := json.Marshal(ev)
	if err != nil {
		return 0, "", err
	}
	hc := &http.Client{Timeout: timeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent"+path, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	msg, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return 0, "", err
	}
	return resp.StatusCode, strings.TrimSpace(string(msg)), nil
}
