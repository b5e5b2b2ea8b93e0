package kubesource

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambitmesh/ambit/internal/control"
	"github.com/ambitmesh/ambit/internal/kube"
)

// Audience is the audience a node proxy's projected token is for, Istio's.
const Audience = "istio-ca"

// DefaultTrustedNodeAccounts is the node proxies' service account in
// Ambit's chart.
const DefaultTrustedNodeAccounts = "ambit-system/ambit-node"

// The extra fields of a bound service-account token's identity.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// Auth authenticates node proxies as istiod does: the caller's token goes
// to the API server in a TokenReview for audience istio-ca; it must be a
// trusted service account's, bound to a pod that still exists (same uid);
// the caller speaks for that pod's node.
type Auth struct {
	Client *kube.Client
	// Pod returns the pod "ns/name" from a cache (the source's informer),
	// or nil: then the API server is asked.
	Pod func(key string) *kube.Pod
	// Trusted are the node proxies' accounts, "namespace/name".
	Trusted []string

	// The API server's favourable verdicts, by the token's SHA-256 (the
	// token itself is not kept), for reviewTTL or until the token expires:
	// a node's many calls (a stream per resource type, a certificate per
	// workload, the renewals) cost one TokenReview a minute, not one each,
	// which is what lets thousands of nodes share one API server. Refusals
	// are not kept: a refused token is asked about again. What follows the
	// review (the pod still there, with the same uid, on its node) is
	// checked on every call, so a deleted pod's token stops working at once.
	mu      sync.Mutex
	reviews map[[32]byte]cachedReview
	asked   atomic.Int64
}

// reviewTTL bounds how long a verdict is reused (the API server's own
// webhook token cache keeps an authenticated one for 2 minutes).
const reviewTTL = time.Minute

// maxReviews bounds the cache; past it, expired entries go first, then all.
const maxReviews = 10000

type cachedReview struct {
	status *kube.TokenReviewStatus
	until  time.Time
}

// Reviews is how many TokenReviews Authenticate has sent.
func (a *Auth) Reviews() int64 { return a.asked.Load() }

// review is the API server's verdict on token, from the cache when it can.
func (a *Auth) review(ctx context.Context, token string) (*kube.TokenReviewStatus, error) {
	sum := sha256.Sum256([]byte(token))
	now := time.Now()
	a.mu.Lock()
	if c, ok := a.reviews[sum]; ok && now.Before(c.until) {
		a.mu.Unlock()
		return c.status, nil
	}
	a.mu.Unlock()
	a.asked.Add(1)
	st, err := a.Client.ReviewToken(ctx, token, []string{Audience})
	if err != nil || !st.Authenticated {
		return st, err
	}
	until := now.Add(reviewTTL)
	if exp, ok := tokenExpiry(token); ok && exp.Before(until) {
		until = exp
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.reviews == nil {
		a.reviews = map[[32]byte]cachedReview{}
	}
	if len(a.reviews) >= maxReviews {
		for k, c := range a.reviews {
			if !now.Before(c.until) {
				delete(a.reviews, k)
			}
		}
		if len(a.reviews) >= maxReviews {
			clear(a.reviews)
		}
	}
	a.reviews[sum] = cachedReview{status: st, until: until}
	return st, nil
}

// tokenExpiry reads a JWT's exp claim, unverified: only to bound how long
// the API server's verdict on it is reused, never to trust it.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.Exp == 0 {
		return time.Time{}, false
	}
	return time.Unix(claims.Exp, 0), true
}

// ParseAccounts reads --trusted-node-accounts: "ns/sa" separated by commas.
func ParseAccounts(s string) ([]string, error) {
	var out []string
	for _, a := range strings.Split(s, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		ns, sa, ok := strings.Cut(a, "/")
		if !ok || ns == "" || sa == "" || strings.Contains(sa, "/") {
			return nil, fmt.Errorf("%q: want namespace/serviceaccount", a)
		}
		out = append(out, a)
	}
	if len(out) == 0 {
		return nil, errors.New("no account given")
	}
	return out, nil
}

// Authenticate implements control.Authenticator.
func (a *Auth) Authenticate(ctx context.Context, token string) (control.Caller, error) {
	st, err := a.review(ctx, token)
	if err != nil {
		return control.Caller{}, fmt.Errorf("TokenReview: %w", err)
	}
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "not authenticated"
		}
		return control.Caller{}, fmt.Errorf("token refused by the API server: %s: %w", why, control.ErrUnauthenticated)
	}
	if !slices.Contains(st.Audiences, Audience) {
		return control.Caller{}, fmt.Errorf("token is not for audience %s (it is for %v): %w", Audience, st.Audiences, control.ErrUnauthenticated)
	}
	rest, ok := strings.CutPrefix(st.User.Username, "system:serviceaccount:")
	ns, sa, ok2 := strings.Cut(rest, ":")
	if !ok || !ok2 {
		return control.Caller{}, fmt.Errorf("%s is not a service account: %w", st.User.Username, control.ErrPermissionDenied)
	}
	account := ns + "/" + sa
	if !slices.Contains(a.Trusted, account) {
		return control.Caller{}, fmt.Errorf("service account %s is not a node proxy's (trusted: %s): %w", account, strings.Join(a.Trusted, ", "), control.ErrPermissionDenied)
	}
	podName, podUID := one(st.User.Extra[extraPodName]), one(st.User.Extra[extraPodUID])
	if podName == "" || podUID == "" {
		return control.Caller{}, fmt.Errorf("token of %s is not bound to a pod (a projected token is; a secret's is not): %w", account, control.ErrUnauthenticated)
	}
	key := ns + "/" + podName
	var pod *kube.Pod
	if a.Pod != nil {
		pod = a.Pod(key)
	}
	if pod == nil || pod.Metadata.UID != podUID {
		// The cache may lag a new pod: the API server decides.
		pod, err = a.Client.GetPod(ctx, ns, podName)
		if kube.IsNotFound(err) {
			return control.Caller{}, fmt.Errorf("token of %s is bound to pod %s, which does not exist: %w", account, key, control.ErrUnauthenticated)
		}
		if err != nil {
			return control.Caller{}, fmt.Errorf("reading pod %s: %w", key, err)
		}
	}
	if pod.Metadata.UID != podUID {
		return control.Caller{}, fmt.Errorf("token of %s is bound to pod %s uid %s, which is gone (that pod is now uid %s): %w", account, key, podUID, pod.Metadata.UID, control.ErrUnauthenticated)
	}
	node := pod.Spec.NodeName
	if node == "" {
		return control.Caller{}, fmt.Errorf("token of %s is bound to pod %s, which is on no node yet: %w", account, key, control.ErrUnauthenticated)
	}
	if n := one(st.User.Extra[extraNodeName]); n != "" && n != node {
		return control.Caller{}, fmt.Errorf("token of %s names node %s but its pod %s is on %s: %w", account, n, key, node, control.ErrUnauthenticated)
	}
	return control.Caller{Node: node, Namespace: ns, ServiceAccount: sa}, nil
}

func one(v []string) string {
	if len(v) != 1 {
		return ""
	}
	return v[0]
}

// String describes the authenticator for logs.
func (a *Auth) String() string {
	return fmt.Sprintf("TokenReview (audience %s, node accounts %s)", Audience, strings.Join(a.Trusted, ", "))
}
