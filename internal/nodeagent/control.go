package nodeagent

import (
	"encoding/json"
	"fmt"
	"net/http"

	"istio.io/istio/pkg/zdsapi"
)

// EnrollRequest is the body of POST /enroll on the agent's control socket.
type EnrollRequest struct {
	UID            string `json:"uid"`
	Name           string `json:"name"`
	Namespace      string `json:"namespace"`
	ServiceAccount string `json:"serviceAccount"`
	NetNS          string `json:"netns"` // path of the pod's network namespace
}

// ControlHandler is the agent's local API, served on a Unix socket: the
// lab (in Kubernetes, the CNI plugin's role) enrolls and unenrolls pods.
//
//	POST /enroll    {"uid", "name", "namespace", "serviceAccount", "netns"}
//	POST /unenroll?uid=UID
//	GET  /pods
func (a *Agent) ControlHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /enroll", func(w http.ResponseWriter, r *http.Request) {
		var req EnrollRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			http.Error(w, "enroll: "+err.Error(), http.StatusBadRequest)
			return
		}
		if req.UID == "" || req.NetNS == "" {
			http.Error(w, "enroll: uid and netns are required", http.StatusBadRequest)
			return
		}
		err := a.Enroll(Pod{UID: req.UID, NSPath: req.NetNS, Info: &zdsapi.WorkloadInfo{
			Name: req.Name, Namespace: req.Namespace, ServiceAccount: req.ServiceAccount}})
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		fmt.Fprintf(w, "enrolled %s\n", req.UID)
	})
	mux.HandleFunc("POST /unenroll", func(w http.ResponseWriter, r *http.Request) {
		uid := r.URL.Query().Get("uid")
		if err := a.Unenroll(uid); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		fmt.Fprintf(w, "unenrolled %s\n", uid)
	})
	mux.HandleFunc("GET /pods", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a.Pods())
	})
	return mux
}
