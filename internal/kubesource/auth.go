package kubesource

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

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
	st, err := a.Client.ReviewToken(ctx, token, []string{Audience})
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
