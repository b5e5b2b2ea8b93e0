package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ambitmesh/ambit/internal/authz"
	"github.com/ambitmesh/ambit/internal/backoff"
	"github.com/ambitmesh/ambit/internal/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	wapi "istio.io/istio/pkg/workloadapi"
	sapi "istio.io/istio/pkg/workloadapi/security"
)

// Client subscribes (wildcard) to both types over delta ADS, keeps the
// resources with their versions, and hands each consistent view to Run's
// apply. A push that does not convert or does not fit together is NACKed
// with the reason, and the previous view stays. It reconnects with backoff
// (10 ms doubling to 15 s), telling the server what it holds. It is a
// workload.Source.
type Client struct {
	Conn *grpc.ClientConn
	Node Node
	Log  *slog.Logger
	// Observer, if set, is told of every message and every stream end:
	// ztunnel's istio_xds_* metrics.
	Observer Observer

	mu        sync.Mutex
	state     map[string]map[string]held // type -> name -> resource
	acked     map[string]bool
	lastNACK  string
	synced    chan struct{} // closed once both types were ACKed; made on first use
	seq       uint64        // arrival order of resources: of two claiming one address, the later wins
	conflicts map[string]bool
	// Rejected counts resources refused one by one (a push's others are
	// served); Conflicts counts addresses claimed twice. Read with
	// Counters.
	rejected, overlaps uint64
}

var _ workload.Source = (*Client)(nil)

// Observer receives what ztunnel's xDS metrics count.
type Observer interface {
	// XDSMessage: a message of typeURL, bytes long, was received.
	XDSMessage(typeURL string, bytes int)
	// XDSTermination: the stream ended, for one of ztunnel's reasons
	// (TerminationReason).
	XDSTermination(reason string)
}

// TerminationReason classes a stream's end as ztunnel's
// istio_xds_connection_terminations_total labels it: ConnectionError (the
// server could not be reached: UNAVAILABLE before any message), Reconnect
// (the server went away later: UNAVAILABLE, as istiod's connection-age
// limit ends streams), Complete (a clean end), Error (anything else, a
// refusal included).
func TerminationReason(received bool, err error) string {
	switch {
	case err == nil || errors.Is(err, io.EOF):
		return "Complete"
	case status.Code(err) == codes.Unavailable && !received:
		return "ConnectionError"
	case status.Code(err) == codes.Unavailable:
		return "Reconnect"
	}
	return "Error"
}

// Node is who the client is to the server: the fields of envoy's core.Node
// that istiod reads of a ztunnel. Its ID must be in ztunnel's form
// (ambient.ZtunnelNodeID): istiod refuses another with "missing parts in
// the service node".
type Node struct {
	ID string
	// Metadata (NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, ISTIO_META_*)
	// becomes a google.protobuf.Struct: values are JSON's (strings,
	// float64, bool, nil, []any, map[string]any).
	Metadata map[string]any
}

// wire is the node's encoding: the id, and the metadata marshalled once.
func (n Node) wire() (id string, meta []byte, err error) {
	if len(n.Metadata) == 0 {
		return n.ID, nil, nil
	}
	st, err := structpb.NewStruct(n.Metadata)
	if err != nil {
		return "", nil, fmt.Errorf("xds: node metadata: %w", err)
	}
	meta, err = proto.MarshalOptions{Deterministic: true}.Marshal(st)
	if err != nil {
		return "", nil, fmt.Errorf("xds: node metadata: %w", err)
	}
	return n.ID, meta, nil
}

// held is a resource the client holds, converted.
type held struct {
	version string
	seq     uint64
	w       *workload.Workload
	s       *workload.Service
	p       *authz.Policy
}

// Ready reports whether both types were ACKed at least once.
func (c *Client) Ready() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.bothAckedLocked()
}

func (c *Client) bothAckedLocked() bool { return c.acked[AddressType] && c.acked[AuthorizationType] }

// Synced is closed once both types were ACKed at least once: the view
// applied last is complete.
func (c *Client) Synced() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.syncedLocked()
}

func (c *Client) syncedLocked() chan struct{} {
	if c.synced == nil {
		c.synced = make(chan struct{})
	}
	return c.synced
}

// LastNACK is the reason of the latest rejected push, if any.
func (c *Client) LastNACK() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastNACK
}

// Run keeps the subscription until ctx ends, handing each new index to
// apply (an error NACKs the push).
func (c *Client) Run(ctx context.Context, apply func(*workload.Index) error) error {
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	c.mu.Lock()
	if c.state == nil {
		c.state = map[string]map[string]held{AddressType: {}, AuthorizationType: {}}
		c.acked = map[string]bool{}
	}
	c.mu.Unlock()
	retry := backoff.Backoff{Min: 10 * time.Millisecond, Max: 15 * time.Second}
	for {
		start := time.Now()
		received, err := c.session(ctx, apply)
		if ctx.Err() != nil {
			return nil
		}
		if c.Observer != nil {
			c.Observer.XDSTermination(TerminationReason(received, err))
		}
		if time.Since(start) > 30*time.Second {
			retry.Reset()
		}
		wait := retry.Next()
		c.Log.Warn("xds stream ended; reconnecting", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// session runs one stream; received says whether a message came on it.
func (c *Client) session(ctx context.Context, apply func(*workload.Index) error) (received bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	nodeID, nodeMeta, err := c.Node.wire()
	if err != nil {
		return false, err
	}
	stream, err := openADS(ctx, c.Conn)
	if err != nil {
		return false, err
	}
	for _, typ := range []string{AddressType, AuthorizationType} {
		c.mu.Lock()
		have := map[string]string{}
		for name, r := range c.state[typ] {
			have[name] = r.version
		}
		c.mu.Unlock()
		// No names to subscribe: a wildcard subscription.
		if err := send(stream, &deltaRequest{nodeID: nodeID, nodeMeta: nodeMeta, typeURL: typ, initial: have}); err != nil {
			return false, err
		}
	}
	for {
		var resp deltaResponse
		n, err := recvSized(stream, &resp)
		if err != nil {
			return received, err
		}
		received = true
		if c.Observer != nil {
			c.Observer.XDSMessage(resp.typeURL, n)
		}
		ack := &deltaRequest{nodeID: nodeID, typeURL: resp.typeURL, nonce: resp.nonce}
		if applied, err := c.handle(&resp, apply); err != nil {
			ack.errorDetail = &rpcStatus{code: 3, message: err.Error()} // INVALID_ARGUMENT
			c.mu.Lock()
			c.lastNACK = err.Error()
			c.mu.Unlock()
			if applied {
				c.Log.Warn("xds push served but for resources refused (NACK names them); those keep their last good version", "type", resp.typeURL, "err", err)
			} else {
				c.Log.Warn("xds push rejected (NACK); keeping the last good config", "type", resp.typeURL, "err", err)
			}
		}
		if err := send(stream, ack); err != nil {
			return received, err
		}
	}
}

// handle applies one push to a copy of the state, resource by resource:
// one that does not decode or convert is refused alone (the version held
// before stays, and the NACK names it) and the rest of the push is served,
// as ztunnel does: a push is never refused whole for one resource. A
// policy that does not convert is held as one that denies everything in
// its scope (fail closed) until a good version comes.
func (c *Client) handle(resp *deltaResponse, apply func(*workload.Index) error) (applied bool, err error) {
	typ := resp.typeURL
	if typ != AddressType && typ != AuthorizationType {
		return false, fmt.Errorf("unknown type %s", typ)
	}
	c.mu.Lock()
	next := map[string]map[string]held{}
	for t, m := range c.state {
		cp := make(map[string]held, len(m))
		for k, v := range m {
			cp[k] = v
		}
		next[t] = cp
	}
	c.mu.Unlock()
	for _, name := range resp.removed {
		delete(next[typ], name)
	}
	var errs []error
	for _, r := range resp.resources {
		res, err := convert(typ, r)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.name, err))
			if res.p == nil {
				continue
			}
			c.Log.Error("policy refused; denying everything in its scope until a good version comes", "policy", r.name, "err", err)
		}
		res.version = r.version
		c.mu.Lock()
		c.seq++
		res.seq = c.seq
		c.mu.Unlock()
		next[typ][r.name] = res
	}
	if len(errs) > 0 {
		c.mu.Lock()
		c.rejected += uint64(len(errs))
		c.mu.Unlock()
	}
	ix, err := c.build(next)
	if err != nil {
		return false, errors.Join(append(errs, err)...)
	}
	if apply != nil {
		if err := apply(ix); err != nil {
			return false, errors.Join(append(errs, err)...)
		}
	}
	c.mu.Lock()
	c.state = next
	was := c.bothAckedLocked()
	c.acked[typ] = true
	if !was && c.bothAckedLocked() {
		close(c.syncedLocked()) // once: acked types stay acked
	}
	c.mu.Unlock()
	return true, errors.Join(errs...) // served; NACKed for the ones refused
}

// convert decodes and converts one resource of a push of typ. A policy
// that does not convert comes back, with the error, as a deny-all of its
// namespace when its name is known.
func convert(typ string, r *resource) (held, error) {
	var res held
	var err error
	switch typ {
	case AddressType:
		var a wapi.Address
		if err = r.unmarshalBody(typ, &a); err == nil {
			switch {
			case a.GetWorkload() != nil:
				res.w, err = WorkloadFromProto(a.GetWorkload())
			case a.GetService() != nil:
				res.s, err = ServiceFromProto(a.GetService())
			default:
				err = errors.New("address holds neither a workload nor a service")
			}
		}
	case AuthorizationType:
		var p sapi.Authorization
		if err = r.unmarshalBody(typ, &p); err == nil {
			res.p, err = PolicyFromProto(&p)
		}
		if err != nil && p.GetName() != "" && p.GetNamespace() != "" {
			scope := authz.ScopeNamespace
			if p.Scope == sapi.Scope_GLOBAL {
				scope = authz.ScopeGlobal
			}
			// One rule of no clauses matches every connection.
			res.p = &authz.Policy{Name: p.Name, Namespace: p.Namespace, Scope: scope, Action: authz.ActionDeny, Rules: [][][]authz.Match{{}}}
		}
	}
	return res, err
}

// unmarshalBody decodes the resource's body into m, which must be of the
// push's type.
func (r *resource) unmarshalBody(typ string, m proto.Message) error {
	switch {
	case !r.hasBody:
		return errors.New("resource has no body")
	case r.bodyType != typ:
		return fmt.Errorf("resource of type %q in a push of %s", r.bodyType, typ)
	}
	return proto.Unmarshal(r.body, m)
}

// build makes the index of what the client holds. Addresses claimed twice
// are settled as ztunnel settles them: the resource that came later keeps
// the address; each conflict is logged once and counted.
func (c *Client) build(st map[string]map[string]held) (*workload.Index, error) {
	var ws []*workload.Workload
	var ss []*workload.Service
	var ps []*authz.Policy
	wseq := map[*workload.Workload]uint64{}
	sseq := map[*workload.Service]uint64{}
	for _, r := range st[AddressType] {
		if r.w != nil {
			ws = append(ws, r.w)
			wseq[r.w] = r.seq
		}
		if r.s != nil {
			ss = append(ss, r.s)
			sseq[r.s] = r.seq
		}
	}
	for _, r := range st[AuthorizationType] {
		ps = append(ps, r.p)
	}
	// A stable order for dumps; references may point ahead (see AllowDangling).
	slices.SortFunc(ws, func(a, b *workload.Workload) int { return strings.Compare(a.UID, b.UID) })
	slices.SortFunc(ss, func(a, b *workload.Service) int { return strings.Compare(a.Key().String(), b.Key().String()) })
	slices.SortFunc(ps, func(a, b *authz.Policy) int { return strings.Compare(a.Key(), b.Key()) })
	report := func(msg string) {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.overlaps++
		if c.conflicts == nil {
			c.conflicts = map[string]bool{}
		}
		if !c.conflicts[msg] && len(c.conflicts) < 1000 { // bounded: a flood of conflicts is counted, not remembered
			c.conflicts[msg] = true
			c.Log.Warn("xds: address claimed twice", "conflict", msg)
		}
	}
	return workload.NewIndex(ws, ss, ps, workload.AllowDangling(),
		workload.Overlaps(func(w *workload.Workload) uint64 { return wseq[w] }, func(s *workload.Service) uint64 { return sseq[s] }, report))
}

// Counters are the client's running counts: resources refused one by one
// (their push otherwise served) and addresses claimed twice.
func (c *Client) Counters() (rejected, overlaps uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rejected, c.overlaps
}
