package control

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Caller is whom a bearer token speaks for: a node proxy on Node. Namespace
// and ServiceAccount are its own account when the authenticator knows it
// (a Kubernetes token does; a lab token does not), so it may hold that
// identity too.
type Caller struct {
	Node                      string
	Namespace, ServiceAccount string
}

// An Authenticator says which node a bearer token speaks for: the lab's
// tokens file (Tokens), or the API server's TokenReview (kubesource.Auth).
// Its errors say why, wrapping ErrUnauthenticated (who the caller is is not
// established) or ErrPermissionDenied (it is, and may not be a node proxy);
// anything else is the authenticator's own failure (the API server out of
// reach), for the caller to retry.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Caller, error)
}

// The two refusals an Authenticator's error wraps.
var (
	ErrUnauthenticated  = errors.New("unauthenticated")
	ErrPermissionDenied = errors.New("permission denied")
)

// authenticate reads the caller's bearer token and asks auth who it is.
func authenticate(ctx context.Context, auth Authenticator) (Caller, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	h := md.Get("authorization")
	if len(h) != 1 {
		return Caller{}, status.Error(codes.Unauthenticated, "no authorization: Bearer token")
	}
	tok, ok := strings.CutPrefix(h[0], "Bearer ")
	if !ok {
		return Caller{}, status.Error(codes.Unauthenticated, "authorization is not a Bearer token")
	}
	c, err := auth.Authenticate(ctx, tok)
	switch {
	case err == nil:
		if c.Node == "" {
			return Caller{}, status.Error(codes.PermissionDenied, "token speaks for no node")
		}
		return c, nil
	case errors.Is(err, ErrUnauthenticated):
		return Caller{}, status.Error(codes.Unauthenticated, err.Error())
	case errors.Is(err, ErrPermissionDenied):
		return Caller{}, status.Error(codes.PermissionDenied, err.Error())
	default:
		return Caller{}, status.Errorf(codes.Unavailable, "authentication: %v", err)
	}
}

// Authenticate finds the token in the file, in constant time per entry.
func (t Tokens) Authenticate(_ context.Context, token string) (Caller, error) {
	for known, node := range t {
		if subtle.ConstantTimeCompare([]byte(known), []byte(token)) == 1 {
			return Caller{Node: node}, nil
		}
	}
	return Caller{}, fmt.Errorf("unknown token: %w", ErrUnauthenticated)
}

// String describes the file for logs (never a token).
func (t Tokens) String() string { return fmt.Sprintf("tokens file (%d nodes)", len(t)) }
