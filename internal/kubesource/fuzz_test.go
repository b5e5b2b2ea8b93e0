package kubesource_test

import (
	"encoding/json"
	"testing"

	"github.com/ambitmesh/ambit/internal/kube"
	"github.com/ambitmesh/ambit/internal/kubesource"
)

// FuzzTranslate: API objects as the API server's JSON (what any user with
// write access to a namespace controls), decoded as the informers decode
// them, then translated together. Nothing may panic; a view always comes
// out, and it always fits together (NewIndex's checks hold).
func FuzzTranslate(f *testing.F) {
	f.Add([]byte(`{"metadata":{"name":"p","namespace":"demo","labels":{"app":"a"},"annotations":{"ambient.istio.io/redirection":"enabled"}},"spec":{"nodeName":"w","containers":[{"name":"c","ports":[{"name":"http","containerPort":8080}]}]},"status":{"phase":"Running","podIPs":[{"ip":"10.0.0.1"}]}}`),
		[]byte(`{"metadata":{"name":"s","namespace":"demo"},"spec":{"clusterIPs":["10.96.0.1"],"ports":[{"port":80,"targetPort":"http"}]}}`),
		[]byte(`{"metadata":{"name":"s-1","namespace":"demo","labels":{"kubernetes.io/service-name":"s"}},"endpoints":[{"addresses":["10.0.0.1"],"targetRef":{"kind":"Pod","name":"p"}}]}`),
		[]byte(`{"metadata":{"name":"a","namespace":"demo"},"spec":{"selector":{"matchLabels":{"app":"a"}},"rules":[{"from":[{"source":{"ipBlocks":["10.0.0.0/8"]}}],"to":[{"operation":{"ports":["80"]}}],"when":[{"key":"destination.ip","values":["::1"]}]}]}}`))
	f.Add([]byte(`{"metadata":{"name":"p","namespace":"demo"},"status":{"podIP":"bad"}}`), []byte(`{"spec":{"clusterIP":"None","ports":[{"port":99999,"targetPort":0}]}}`), []byte(`{}`), []byte(`{"spec":{"action":"AUDIT"}}`))
	f.Fuzz(func(t *testing.T, pod, svc, slice, policy []byte) {
		var st kubesource.State
		st.Namespaces = []*kube.Namespace{{Metadata: kube.ObjectMeta{Name: "demo", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}}}
		var p kube.Pod
		if json.Unmarshal(pod, &p) == nil {
			st.Pods = append(st.Pods, &p, &p) // twice: the second is a clash
		}
		var s kube.Service
		if json.Unmarshal(svc, &s) == nil {
			st.Services = append(st.Services, &s)
		}
		var es kube.EndpointSlice
		if json.Unmarshal(slice, &es) == nil {
			st.EndpointSlices = append(st.EndpointSlices, &es)
		}
		var ap kube.AuthorizationPolicy
		if json.Unmarshal(policy, &ap) == nil {
			st.Policies = append(st.Policies, &ap)
		}
		ix, _ := kubesource.Translate(st, kubesource.Options{})
		if ix == nil {
			t.Fatal("no view")
		}
		if len(ix.Workloads()) > 1 {
			t.Fatalf("one pod twice gave %d workloads", len(ix.Workloads()))
		}
	})
}
