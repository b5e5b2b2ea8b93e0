package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/emptypb"
)

// The delta ADS messages, encoded and decoded here by hand: the fields
// Ambit uses of envoy.service.discovery.v3's DeltaDiscoveryRequest and
// DeltaDiscoveryResponse. go-control-plane's generated types would link
// Envoy's whole core API (every message a Node can reference: addresses,
// config sources, matchers...), ~2 MB of code and descriptors that every
// ambit process, node proxies included, maps and initialises (see
// docs/benchmarks.md). The tests check both ways against those types.
//
// Unknown fields, and known ones of an unexpected wire type, are skipped
// (as protobuf does); malformed input is an error that names the field.

// adsMethod is the delta stream of envoy.service.discovery.v3's
// AggregatedDiscoveryService.
const (
	adsService = "envoy.service.discovery.v3.AggregatedDiscoveryService"
	adsMethod  = "/" + adsService + "/DeltaAggregatedResources"
)

// deltaRequest is a DeltaDiscoveryRequest.
type deltaRequest struct {
	nodeID      string            // node (1) . id (1)
	nodeMeta    []byte            // node (1) . metadata (3): a google.protobuf.Struct, encoded
	typeURL     string            // 2
	subscribe   []string          // resource_names_subscribe (3)
	unsubscribe []string          // resource_names_unsubscribe (4)
	initial     map[string]string // initial_resource_versions (5)
	nonce       string            // response_nonce (6)
	errorDetail *rpcStatus        // error_detail (7): a NACK
}

// rpcStatus is a google.rpc.Status without details.
type rpcStatus struct {
	code    int32  // 1
	message string // 2
}

// deltaResponse is a DeltaDiscoveryResponse.
type deltaResponse struct {
	typeURL   string      // 4
	resources []*resource // 2
	removed   []string    // removed_resources (6)
	nonce     string      // 5
}

// resource is a discovery Resource; its body is a google.protobuf.Any.
type resource struct {
	name     string // 3
	version  string // 1
	hasBody  bool   // resource (2) was present
	bodyType string // resource.type_url
	body     []byte // resource.value
}

func (r *deltaRequest) marshal() []byte {
	var b []byte
	if r.nodeID != "" || len(r.nodeMeta) > 0 {
		node := appendString(nil, 1, r.nodeID)
		if len(r.nodeMeta) > 0 {
			node = protowire.AppendTag(node, 3, protowire.BytesType)
			node = protowire.AppendBytes(node, r.nodeMeta)
		}
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendBytes(b, node)
	}
	b = appendString(b, 2, r.typeURL)
	for _, n := range r.subscribe {
		b = protowire.AppendTag(b, 3, protowire.BytesType)
		b = protowire.AppendString(b, n)
	}
	for _, n := range r.unsubscribe {
		b = protowire.AppendTag(b, 4, protowire.BytesType)
		b = protowire.AppendString(b, n)
	}
	for k, v := range r.initial {
		entry := appendString(appendString(nil, 1, k), 2, v)
		b = protowire.AppendTag(b, 5, protowire.BytesType)
		b = protowire.AppendBytes(b, entry)
	}
	b = appendString(b, 6, r.nonce)
	if d := r.errorDetail; d != nil {
		var st []byte
		if d.code != 0 {
			st = protowire.AppendTag(st, 1, protowire.VarintType)
			st = protowire.AppendVarint(st, uint64(int64(d.code)))
		}
		st = appendString(st, 2, d.message)
		b = protowire.AppendTag(b, 7, protowire.BytesType)
		b = protowire.AppendBytes(b, st)
	}
	return b
}

func (r *deltaRequest) unmarshal(b []byte) error {
	*r = deltaRequest{}
	return eachField(b, "DeltaDiscoveryRequest", func(num protowire.Number, v []byte) error {
		var err error
		switch num {
		case 1:
			err = eachField(v, "node", func(num protowire.Number, v []byte) error {
				switch num {
				case 1:
					return str(&r.nodeID, v, "node.id")
				case 3:
					r.nodeMeta = v
				}
				return nil
			})
		case 2:
			err = str(&r.typeURL, v, "type_url")
		case 3:
			err = appendStr(&r.subscribe, v, "resource_names_subscribe")
		case 4:
			err = appendStr(&r.unsubscribe, v, "resource_names_unsubscribe")
		case 5:
			var k, val string
			err = eachField(v, "initial_resource_versions", func(num protowire.Number, v []byte) error {
				switch num {
				case 1:
					return str(&k, v, "initial_resource_versions key")
				case 2:
					return str(&val, v, "initial_resource_versions value")
				}
				return nil
			})
			if err == nil {
				if r.initial == nil {
					r.initial = map[string]string{}
				}
				r.initial[k] = val
			}
		case 6:
			err = str(&r.nonce, v, "response_nonce")
		case 7:
			r.errorDetail = &rpcStatus{}
			err = r.errorDetail.unmarshal(v)
		}
		return err
	})
}

func (s *rpcStatus) unmarshal(b []byte) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fieldErr("error_detail", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return fieldErr("error_detail.code", protowire.ParseError(n))
			}
			s.code = int32(v)
			b = b[n:]
		case num == 2 && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return fieldErr("error_detail.message", protowire.ParseError(n))
			}
			if err := str(&s.message, v, "error_detail.message"); err != nil {
				return err
			}
			b = b[n:]
		default:
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return fieldErr("error_detail", protowire.ParseError(n))
			}
			b = b[n:]
		}
	}
	return nil
}

func (r *deltaResponse) marshal() []byte {
	var b []byte
	for _, res := range r.resources {
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, res.marshal())
	}
	b = appendString(b, 4, r.typeURL)
	b = appendString(b, 5, r.nonce)
	for _, n := range r.removed {
		b = protowire.AppendTag(b, 6, protowire.BytesType)
		b = protowire.AppendString(b, n)
	}
	return b
}

func (r *resource) marshal() []byte {
	b := appendString(nil, 1, r.version)
	if r.hasBody {
		body := appendString(nil, 1, r.bodyType)
		if len(r.body) > 0 {
			body = protowire.AppendTag(body, 2, protowire.BytesType)
			body = protowire.AppendBytes(body, r.body)
		}
		b = protowire.AppendTag(b, 2, protowire.BytesType)
		b = protowire.AppendBytes(b, body)
	}
	return appendString(b, 3, r.name)
}

func (r *deltaResponse) unmarshal(b []byte) error {
	*r = deltaResponse{}
	return eachField(b, "DeltaDiscoveryResponse", func(num protowire.Number, v []byte) error {
		switch num {
		case 2:
			res := &resource{}
			if err := res.unmarshal(v); err != nil {
				return err
			}
			r.resources = append(r.resources, res)
		case 4:
			return str(&r.typeURL, v, "type_url")
		case 5:
			return str(&r.nonce, v, "nonce")
		case 6:
			return appendStr(&r.removed, v, "removed_resources")
		}
		return nil
	})
}

func (r *resource) unmarshal(b []byte) error {
	return eachField(b, "resources", func(num protowire.Number, v []byte) error {
		switch num {
		case 1:
			return str(&r.version, v, "resources.version")
		case 2:
			r.hasBody = true
			return eachField(v, "resources.resource", func(num protowire.Number, v []byte) error {
				switch num {
				case 1:
					return str(&r.bodyType, v, "resources.resource.type_url")
				case 2:
					r.body = v
				}
				return nil
			})
		case 3:
			return str(&r.name, v, "resources.name")
		}
		return nil
	})
}

// eachField calls f with each length-delimited field of the message b
// (every field Ambit reads is one); others are skipped.
func eachField(b []byte, msg string, f func(protowire.Number, []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fieldErr(msg, protowire.ParseError(n))
		}
		b = b[n:]
		if typ != protowire.BytesType {
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return fieldErr(msg, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return fieldErr(fmt.Sprintf("%s field %d", msg, num), protowire.ParseError(n))
		}
		b = b[n:]
		if err := f(num, v); err != nil {
			return err
		}
	}
	return nil
}

func fieldErr(where string, err error) error { return fmt.Errorf("xds: %s: %w", where, err) }

var errUTF8 = errors.New("string field is not valid UTF-8")

func str(dst *string, v []byte, field string) error {
	if !utf8.Valid(v) {
		return fieldErr(field, errUTF8)
	}
	*dst = string(v)
	return nil
}

func appendStr(dst *[]string, v []byte, field string) error {
	var s string
	if err := str(&s, v, field); err != nil {
		return err
	}
	*dst = append(*dst, s)
	return nil
}

// appendString appends a string field, omitted when empty (proto3).
func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// carrier moves encoded bytes through gRPC's default (protobuf) codec: an
// Empty message whose unknown fields are the whole message. Protobuf keeps
// unknown fields as they came, in both directions, so the bytes on the
// wire are exactly ours; no codec needs registering, and the control
// plane's gRPC server goes on serving Istio's CA protocol beside it.
func carrier(b []byte) *emptypb.Empty {
	m := &emptypb.Empty{}
	m.ProtoReflect().SetUnknown(b)
	return m
}

func carried(m *emptypb.Empty) []byte { return m.ProtoReflect().GetUnknown() }

// adsStream is one delta ADS stream, either end.
type adsStream interface {
	SendMsg(m any) error
	RecvMsg(m any) error
	Context() context.Context
}

// send writes one request. A stream the server has closed (it refused
// the token, say) reports io.EOF on send; the reason is the status that
// RecvMsg returns, so that is what send returns then.
func send(s adsStream, m interface{ marshal() []byte }) error {
	err := s.SendMsg(carrier(m.marshal()))
	if errors.Is(err, io.EOF) {
		var c emptypb.Empty
		if rerr := s.RecvMsg(&c); rerr != nil {
			return rerr
		}
	}
	return err
}

func recv(s adsStream, m interface{ unmarshal([]byte) error }) error {
	_, err := recvSized(s, m)
	return err
}

// recvSized is recv that also says how many bytes the message was.
func recvSized(s adsStream, m interface{ unmarshal([]byte) error }) (int, error) {
	var c emptypb.Empty
	if err := s.RecvMsg(&c); err != nil {
		return 0, err
	}
	b := carried(&c)
	return len(b), m.unmarshal(b)
}

// openADS starts a delta ADS stream on conn.
func openADS(ctx context.Context, conn grpc.ClientConnInterface) (grpc.ClientStream, error) {
	return conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "DeltaAggregatedResources", ServerStreams: true, ClientStreams: true}, adsMethod)
}
