package kube

import (
	"encoding/json"
	"fmt"
	"strconv"
)

// The API objects the mesh reads, with only the fields it uses: the API
// server's JSON decodes into them and ignores the rest. Field names and
// JSON keys are the API's own.

// ObjectMeta is metadata.
type ObjectMeta struct {
	Name              string            `json:"name"`
	Namespace         string            `json:"namespace,omitempty"`
	UID               string            `json:"uid,omitempty"`
	ResourceVersion   string            `json:"resourceVersion,omitempty"`
	Labels            map[string]string `json:"labels,omitempty"`
	Annotations       map[string]string `json:"annotations,omitempty"`
	DeletionTimestamp *string           `json:"deletionTimestamp,omitempty"`
	OwnerReferences   []OwnerReference  `json:"ownerReferences,omitempty"`
}

// Key is "namespace/name" ("name" for a cluster-scoped object).
func (m *ObjectMeta) Key() string {
	if m.Namespace == "" {
		return m.Name
	}
	return m.Namespace + "/" + m.Name
}

// OwnerReference names an object's owner (a Pod's ReplicaSet, ...).
type OwnerReference struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Name       string `json:"name"`
	UID        string `json:"uid,omitempty"`
	Controller *bool  `json:"controller,omitempty"`
}

// Namespace is a core/v1 Namespace.
type Namespace struct {
	Metadata ObjectMeta `json:"metadata"`
}

// DaemonSet is an apps/v1 DaemonSet, its metadata only: the node agent
// watches its own to tell an uninstall from a restart.
type DaemonSet struct {
	Metadata ObjectMeta `json:"metadata"`
}

// Node is a core/v1 Node: its labels carry its locality.
type Node struct {
	Metadata ObjectMeta `json:"metadata"`
}

// Pod is a core/v1 Pod.
type Pod struct {
	Metadata ObjectMeta `json:"metadata"`
	Spec     PodSpec    `json:"spec"`
	Status   PodStatus  `json:"status"`
}

// PodSpec is the part of a pod's spec the mesh uses.
type PodSpec struct {
	NodeName           string      `json:"nodeName,omitempty"`
	ServiceAccountName string      `json:"serviceAccountName,omitempty"`
	HostNetwork        bool        `json:"hostNetwork,omitempty"`
	Containers         []Container `json:"containers,omitempty"`
}

// Container is one container's ports.
type Container struct {
	Name  string          `json:"name"`
	Ports []ContainerPort `json:"ports,omitempty"`
}

// ContainerPort is a port a container declares; a Service's named
// targetPort resolves through it.
type ContainerPort struct {
	Name          string `json:"name,omitempty"`
	ContainerPort int32  `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"`
}

// PodStatus is where the pod runs and whether it is ready.
type PodStatus struct {
	Phase      string         `json:"phase,omitempty"`
	PodIP      string         `json:"podIP,omitempty"`
	PodIPs     []PodIP        `json:"podIPs,omitempty"`
	Conditions []PodCondition `json:"conditions,omitempty"`
}

// PodIP is one of a pod's addresses.
type PodIP struct {
	IP string `json:"ip"`
}

// PodCondition is one condition (Ready, ...).
type PodCondition struct {
	Type   string `json:"type"`
	Status string `json:"status"`
}

// Service is a core/v1 Service.
type Service struct {
	Metadata ObjectMeta  `json:"metadata"`
	Spec     ServiceSpec `json:"spec"`
}

// ServiceSpec is the part of a service's spec the mesh uses.
type ServiceSpec struct {
	Type                string            `json:"type,omitempty"`
	ClusterIP           string            `json:"clusterIP,omitempty"`
	ClusterIPs          []string          `json:"clusterIPs,omitempty"`
	Selector            map[string]string `json:"selector,omitempty"`
	Ports               []ServicePort     `json:"ports,omitempty"`
	ExternalName        string            `json:"externalName,omitempty"`
	TrafficDistribution *string           `json:"trafficDistribution,omitempty"`
}

// ServicePort maps a service port to its pods' target port.
type ServicePort struct {
	Name       string      `json:"name,omitempty"`
	Protocol   string      `json:"protocol,omitempty"`
	Port       int32       `json:"port"`
	TargetPort IntOrString `json:"targetPort"`
}

// IntOrString is a port number or a port's name.
type IntOrString struct {
	Int int32
	Str string // set when the value is a name
}

// UnmarshalJSON takes 8080, "8080" (as the API server keeps it at times)
// or "http".
func (v *IntOrString) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		if n, err := strconv.ParseInt(s, 10, 32); err == nil {
			*v = IntOrString{Int: int32(n)}
			return nil
		}
		*v = IntOrString{Str: s}
		return nil
	}
	var n int32
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("want a port number or name, got %s", b)
	}
	*v = IntOrString{Int: n}
	return nil
}

// MarshalJSON writes the number or the name.
func (v IntOrString) MarshalJSON() ([]byte, error) {
	if v.Str != "" {
		return json.Marshal(v.Str)
	}
	return json.Marshal(v.Int)
}

// EndpointSlice is a discovery/v1 EndpointSlice.
type EndpointSlice struct {
	Metadata    ObjectMeta     `json:"metadata"`
	AddressType string         `json:"addressType"`
	Endpoints   []Endpoint     `json:"endpoints"`
	Ports       []EndpointPort `json:"ports"`
}

// Endpoint is one backend of a slice.
type Endpoint struct {
	Addresses  []string           `json:"addresses"`
	Conditions EndpointConditions `json:"conditions"`
	TargetRef  *ObjectReference   `json:"targetRef,omitempty"`
	NodeName   *string            `json:"nodeName,omitempty"`
}

// EndpointConditions: nil means unknown, which the API reads as true for
// ready and serving.
type EndpointConditions struct {
	Ready       *bool `json:"ready,omitempty"`
	Serving     *bool `json:"serving,omitempty"`
	Terminating *bool `json:"terminating,omitempty"`
}

// ObjectReference points at an object (an endpoint's Pod).
type ObjectReference struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	UID       string `json:"uid,omitempty"`
}

// EndpointPort is a slice's port: Port is the target port its endpoints
// listen on, Name the service port's name it serves.
type EndpointPort struct {
	Name     *string `json:"name,omitempty"`
	Port     *int32  `json:"port,omitempty"`
	Protocol *string `json:"protocol,omitempty"`
}

// AuthorizationPolicy is Istio's security.istio.io/v1 AuthorizationPolicy,
// the fields of its spec as Istio's API defines them.
type AuthorizationPolicy struct {
	Metadata ObjectMeta              `json:"metadata"`
	Spec     AuthorizationPolicySpec `json:"spec"`
}

// AuthorizationPolicySpec is istio.security.v1.AuthorizationPolicy.
type AuthorizationPolicySpec struct {
	Selector   *WorkloadSelector `json:"selector,omitempty"`
	TargetRef  *PolicyTargetRef  `json:"targetRef,omitempty"`
	TargetRefs []PolicyTargetRef `json:"targetRefs,omitempty"`
	Rules      []Rule            `json:"rules,omitempty"`
	Action     string            `json:"action,omitempty"`
	Provider   *struct {
		Name string `json:"name"`
	} `json:"provider,omitempty"`
}

// WorkloadSelector selects pods by labels.
type WorkloadSelector struct {
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// PolicyTargetRef attaches a policy to a Gateway, a Service or a waypoint.
type PolicyTargetRef struct {
	Group     string `json:"group,omitempty"`
	Kind      string `json:"kind"`
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
}

// Rule is one rule: every from, to and when must match.
type Rule struct {
	From []struct {
		Source Source `json:"source"`
	} `json:"from,omitempty"`
	To []struct {
		Operation Operation `json:"operation"`
	} `json:"to,omitempty"`
	When []Condition `json:"when,omitempty"`
}

// Source is who a rule lets in (or keeps out).
type Source struct {
	Principals           []string `json:"principals,omitempty"`
	NotPrincipals        []string `json:"notPrincipals,omitempty"`
	RequestPrincipals    []string `json:"requestPrincipals,omitempty"`
	NotRequestPrincipals []string `json:"notRequestPrincipals,omitempty"`
	Namespaces           []string `json:"namespaces,omitempty"`
	NotNamespaces        []string `json:"notNamespaces,omitempty"`
	ServiceAccounts      []string `json:"serviceAccounts,omitempty"`
	NotServiceAccounts   []string `json:"notServiceAccounts,omitempty"`
	IPBlocks             []string `json:"ipBlocks,omitempty"`
	NotIPBlocks          []string `json:"notIpBlocks,omitempty"`
	RemoteIPBlocks       []string `json:"remoteIpBlocks,omitempty"`
	NotRemoteIPBlocks    []string `json:"notRemoteIpBlocks,omitempty"`
}

// Operation is what a rule matches at the destination.
type Operation struct {
	Hosts      []string `json:"hosts,omitempty"`
	NotHosts   []string `json:"notHosts,omitempty"`
	Ports      []string `json:"ports,omitempty"`
	NotPorts   []string `json:"notPorts,omitempty"`
	Methods    []string `json:"methods,omitempty"`
	NotMethods []string `json:"notMethods,omitempty"`
	Paths      []string `json:"paths,omitempty"`
	NotPaths   []string `json:"notPaths,omitempty"`
}

// Condition is one "when" condition.
type Condition struct {
	Key       string   `json:"key"`
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"notValues,omitempty"`
}

// TokenReview is an authentication.k8s.io/v1 TokenReview.
type TokenReview struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Spec       TokenReviewSpec   `json:"spec"`
	Status     TokenReviewStatus `json:"status"`
}

// TokenReviewSpec is the token and the audiences it must be for.
type TokenReviewSpec struct {
	Token     string   `json:"token"`
	Audiences []string `json:"audiences,omitempty"`
}

// TokenReviewStatus is the API server's verdict.
type TokenReviewStatus struct {
	Authenticated bool     `json:"authenticated,omitempty"`
	User          UserInfo `json:"user,omitempty"`
	Audiences     []string `json:"audiences,omitempty"`
	Error         string   `json:"error,omitempty"`
}

// UserInfo is who the token speaks for. A bound service-account token's
// Extra holds the pod it is bound to
// (authentication.kubernetes.io/pod-name, pod-uid, node-name).
type UserInfo struct {
	Username string              `json:"username,omitempty"`
	UID      string              `json:"uid,omitempty"`
	Groups   []string            `json:"groups,omitempty"`
	Extra    map[string][]string `json:"extra,omitempty"`
}

// Status is the API's error body.
type Status struct {
	Kind    string `json:"kind"`
	Status  string `json:"status"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Code    int32  `json:"code"`
}
