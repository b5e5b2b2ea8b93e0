// Package kube is Ambit's access to the Kubernetes API server: list and
// watch of the objects the mesh is made of (an informer: a list, then a
// watch from its resourceVersion, relisting on 410 Gone), TokenReview, and
// patches of a pod's annotations, as JSON over HTTPS.
//
// Written by hand, not with client-go, for one measured reason: Go runs the
// init functions of every package linked into a binary in every process of
// it, and Ambit is one binary. Linking client-go's informers and rest
// client with the API types the mesh needs (core/v1, discovery/v1,
// authentication/v1, istio.io/client-go's security/v1) raised the node
// proxy's RSS at start from 18.5 to 23.6 MB (anon +0.9, binary pages +4.3),
// and the full typed clientsets by 16 MB, on 10,000 idle connections that
// had 0.8 MB of headroom under the 40 MB bar (docs/kubernetes-linking.md).
// What the mesh needs of the API is small: this package is it. The tests
// write with client-go, the reference client, and read with this one.
package kube

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// Client talks to one API server.
type Client struct {
	cfg  Config
	http *http.Client

	mu        sync.Mutex
	token     string
	tokenRead time.Time
}

// tokenRefresh is how often a token file is read again: projected tokens
// rotate (the kubelet refreshes them at 80% of their life, an hour at
// least), and client-go re-reads as often.
const tokenRefresh = time.Minute

// New makes a client for cfg.
func New(cfg *Config) (*Client, error) {
	if cfg == nil || cfg.Server == "" {
		return nil, errNoServer
	}
	if cfg.Token != "" && cfg.TokenFile != "" {
		return nil, fmt.Errorf("kube: %s: both a token and a token file", cfg.Source)
	}
	tlsConf := &tls.Config{RootCAs: cfg.Roots, ServerName: cfg.ServerName, MinVersion: tls.VersionTLS12}
	if cfg.Cert != nil {
		tlsConf.Certificates = []tls.Certificate{*cfg.Cert}
	}
	tr := &http.Transport{
		TLSClientConfig:     tlsConf,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     90 * time.Second,
		MaxIdleConnsPerHost: 8,
		// A watch is one long response: PINGs find a dead connection that
		// would otherwise hold it until its timeout.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second},
	}
	return &Client{cfg: *cfg, http: &http.Client{Transport: tr}}, nil
}

// Close ends the client's idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// bearer is the token to send, re-read from its file once a minute.
func (c *Client) bearer() (string, error) {
	if c.cfg.TokenFile == "" {
		return c.cfg.Token, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.token != "" && time.Since(c.tokenRead) < tokenRefresh {
		return c.token, nil
	}
	b, err := os.ReadFile(c.cfg.TokenFile)
	if err != nil {
		if c.token != "" {
			return c.token, nil // keep the last one; the file is mid-swap
		}
		return "", fmt.Errorf("kube: token: %w", err)
	}
	c.token, c.tokenRead = strings.TrimSpace(string(b)), time.Now()
	return c.token, nil
}

// APIError is the API server's refusal: its HTTP status and Status body.
type APIError struct {
	Method, Path string
	Status       Status
}

func (e *APIError) Error() string {
	msg := e.Status.Message
	if msg == "" {
		msg = http.StatusText(int(e.Status.Code))
	}
	return fmt.Sprintf("kube: %s %s: %d %s: %s", e.Method, e.Path, e.Status.Code, e.Status.Reason, msg)
}

// IsGone reports a 410: the resourceVersion a watch asked for is too old.
func IsGone(err error) bool { return hasStatus(err, http.StatusGone) }

// IsNotFound: the object, or the whole resource, is not there (404).
func IsNotFound(err error) bool { return hasStatus(err, http.StatusNotFound) }

// IsForbidden reports an API server's 403: the caller's RBAC does not
// allow it (or no longer does).
func IsForbidden(err error) bool { return hasStatus(err, http.StatusForbidden) }

// hasStatus: err is the API server's answer with this HTTP status.
func hasStatus(err error, code int32) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status.Code == code
}

// maxBody bounds what one response may hold in memory (a list of every pod
// of a large cluster fits; a hostile or broken server's stream does not).
const maxBody = 256 << 20

// request sends one request; the caller closes the body of a 2xx answer.
func (c *Client) request(ctx context.Context, method, path string, query url.Values, contentType string, body []byte) (*http.Response, error) {
	u := c.cfg.Server + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, fmt.Errorf("kube: %s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "ambit")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	tok, err := c.bearer()
	if err != nil {
		return nil, err
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kube: %s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	ae := &APIError{Method: method, Path: path}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &ae.Status) != nil || ae.Status.Code == 0 {
		ae.Status = Status{Code: int32(resp.StatusCode), Message: strings.TrimSpace(string(b))}
	}
	ae.Status.Code = int32(resp.StatusCode)
	return nil, ae
}

// do sends a request and decodes a JSON answer into out (if not nil).
func (c *Client) do(ctx context.Context, method, path string, query url.Values, contentType string, in, out any) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("kube: %s %s: %w", method, path, err)
		}
	}
	resp, err := c.request(ctx, method, path, query, contentType, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, err = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
		return err
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(out); err != nil {
		return fmt.Errorf("kube: %s %s: decoding the answer: %w", method, path, err)
	}
	return nil
}

// Resource names a collection: the core group's is /api/v1/pods, another
// group's /apis/discovery.k8s.io/v1/endpointslices.
type Resource struct {
	Group, Version, Resource string
	// Kind is the object kind, for logs and metrics.
	Kind string
}

// The resources the mesh reads.
var (
	Namespaces            = Resource{"", "v1", "namespaces", "Namespace"}
	Nodes                 = Resource{"", "v1", "nodes", "Node"}
	Pods                  = Resource{"", "v1", "pods", "Pod"}
	Services              = Resource{"", "v1", "services", "Service"}
	EndpointSlices        = Resource{"discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"}
	AuthorizationPolicies = Resource{"security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy"}
	// The node agent reads its own DaemonSet: gone or going, it is being
	// uninstalled, not restarted.
	DaemonSets = Resource{"apps", "v1", "daemonsets", "DaemonSet"}
	// The control plane publishes its root certificate in one.
	ConfigMaps = Resource{"", "v1", "configmaps", "ConfigMap"}
)

// Path is the collection's path across namespaces, or in ns.
func (r Resource) Path(ns string) string {
	p := "/api/" + r.Version
	if r.Group != "" {
		p = "/apis/" + r.Group + "/" + r.Version
	}
	if ns != "" {
		p += "/namespaces/" + url.PathEscape(ns)
	}
	return p + "/" + r.Resource
}

// Selector narrows a list or watch: a field selector such as
// spec.nodeName=worker1, a label selector.
type Selector struct {
	Field, Label string
}

func (s Selector) query(q url.Values) url.Values {
	if s.Field != "" {
		q.Set("fieldSelector", s.Field)
	}
	if s.Label != "" {
		q.Set("labelSelector", s.Label)
	}
	return q
}

// list is the collection's items, undecoded, and its resourceVersion.
type list struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
		Continue        string `json:"continue"`
	} `json:"metadata"`
	Items []json.RawMessage `json:"items"`
}

// listPage bounds one page of a list, so a cluster's pods come in pieces
// the API server serves from its cache.
const listPage = 500

// List reads the whole collection, page by page, with the resourceVersion
// a watch goes on from. Items stay undecoded: the caller decodes each, so
// one it cannot read costs that one only.
func (c *Client) List(ctx context.Context, r Resource, sel Selector) ([]json.RawMessage, string, error) {
	var items []json.RawMessage
	cont := ""
	for {
		q := sel.query(url.Values{"limit": {fmt.Sprint(listPage)}})
		if cont != "" {
			q.Set("continue", cont)
		}
		var l list
		if err := c.do(ctx, http.MethodGet, r.Path(""), q, "", nil, &l); err != nil {
			return nil, "", err
		}
		items = append(items, l.Items...)
		if l.Metadata.Continue == "" {
			return items, l.Metadata.ResourceVersion, nil
		}
		cont = l.Metadata.Continue
	}
}

// Event is one watch event: ADDED, MODIFIED, DELETED, BOOKMARK or ERROR.
type Event struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

// Watch streams the collection's changes after resourceVersion rv, with
// bookmarks, until the server ends the watch (after timeout), ctx ends, or
// a decode fails. each is called in order; an ERROR event comes back as an
// *APIError (a 410 for a resourceVersion too old: relist).
func (c *Client) Watch(ctx context.Context, r Resource, sel Selector, rv string, timeout time.Duration, each func(Event) error) error {
	q := sel.query(url.Values{
		"watch":               {"true"},
		"allowWatchBookmarks": {"true"},
		"resourceVersion":     {rv},
		"timeoutSeconds":      {fmt.Sprint(int(timeout.Seconds()))},
	})
	resp, err := c.request(ctx, http.MethodGet, r.Path(""), q, "", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var ev Event
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("kube: watch %s: %w", r.Path(""), err)
		}
		if ev.Type == "ERROR" {
			ae := &APIError{Method: "WATCH", Path: r.Path("")}
			if err := json.Unmarshal(ev.Object, &ae.Status); err != nil {
				return fmt.Errorf("kube: watch %s: an ERROR event that does not read: %w", r.Path(""), err)
			}
			return ae
		}
		if err := each(ev); err != nil {
			return err
		}
	}
}

// ReviewToken asks the API server who a token is, for the audiences given.
func (c *Client) ReviewToken(ctx context.Context, token string, audiences []string) (*TokenReviewStatus, error) {
	in := TokenReview{APIVersion: "authentication.k8s.io/v1", Kind: "TokenReview",
		Spec: TokenReviewSpec{Token: token, Audiences: audiences}}
	var out TokenReview
	if err := c.do(ctx, http.MethodPost, "/apis/authentication.k8s.io/v1/tokenreviews", nil, "application/json", in, &out); err != nil {
		return nil, err
	}
	return &out.Status, nil
}

// RequestToken asks for a token of the service account ns/name (the
// TokenRequest API), valid for ttl and bound to the Node named node: it
// dies with the node, not with any one pod, so a CNI plugin holding it
// still works while the pod that asked is being replaced.
func (c *Client) RequestToken(ctx context.Context, ns, name, node, nodeUID string, ttl time.Duration) (string, time.Time, error) {
	in := map[string]any{
		"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
		"spec": map[string]any{
			"expirationSeconds": int64(ttl / time.Second),
			"boundObjectRef":    map[string]any{"apiVersion": "v1", "kind": "Node", "name": node, "uid": nodeUID},
		},
	}
	var out struct {
		Status struct {
			Token               string    `json:"token"`
			ExpirationTimestamp time.Time `json:"expirationTimestamp"`
		} `json:"status"`
	}
	path := "/api/v1/namespaces/" + url.PathEscape(ns) + "/serviceaccounts/" + url.PathEscape(name) + "/token"
	if err := c.do(ctx, http.MethodPost, path, nil, "application/json", in, &out); err != nil {
		return "", time.Time{}, err
	}
	if out.Status.Token == "" {
		return "", time.Time{}, fmt.Errorf("kube: TokenRequest for %s/%s returned no token", ns, name)
	}
	return out.Status.Token, out.Status.ExpirationTimestamp, nil
}

// AnnotatePod sets (value not nil) or removes (nil) annotations on a pod,
// with a JSON merge patch: nothing else of the pod is touched.
func (c *Client) AnnotatePod(ctx context.Context, ns, name string, annotations map[string]*string) error {
	patch := map[string]any{"metadata": map[string]any{"annotations": annotations}}
	return c.do(ctx, http.MethodPatch, Pods.Path(ns)+"/"+url.PathEscape(name), nil, "application/merge-patch+json", patch, nil)
}

// ApplyConfigMap makes the ConfigMap ns/name hold exactly data, created
// if absent: a server-side apply by fieldManager, so a second writer's
// keys are not this one's to remove.
func (c *Client) ApplyConfigMap(ctx context.Context, ns, name, fieldManager string, labels, data map[string]string) error {
	body := map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{"name": name, "namespace": ns, "labels": labels},
		"data":     data,
	}
	q := url.Values{"fieldManager": {fieldManager}, "force": {"true"}}
	return c.do(ctx, http.MethodPatch, ConfigMaps.Path(ns)+"/"+url.PathEscape(name), q, "application/apply-patch+yaml", body, nil)
}

// PodLog is a container's log lines since a time (the kubelet's, through
// the API server's pods/log).
func (c *Client) PodLog(ctx context.Context, ns, pod, container string, since time.Time) ([]string, error) {
	q := url.Values{"container": {container}, "sinceTime": {since.UTC().Format(time.RFC3339)}}
	resp, err := c.request(ctx, http.MethodGet, Pods.Path(ns)+"/"+url.PathEscape(pod)+"/log", q, "", nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(b), "\n"), "\n"), nil
}

// Get reads one object from the API server (not a cache) into out: for
// an object an informer has not seen yet. ns is "" for a cluster-scoped
// resource.
func (c *Client) Get(ctx context.Context, r Resource, ns, name string, out any) error {
	return c.do(ctx, http.MethodGet, r.Path(ns)+"/"+url.PathEscape(name), nil, "", nil, out)
}

// GetPod is Get for a pod.
func (c *Client) GetPod(ctx context.Context, ns, name string) (*Pod, error) {
	var p Pod
	if err := c.Get(ctx, Pods, ns, name, &p); err != nil {
		return nil, err
	}
	return &p, nil
}
