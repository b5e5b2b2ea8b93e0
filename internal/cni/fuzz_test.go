package cni

import (
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
)

// FuzzParse: whatever the runtime passes (the network configuration on
// stdin, CNI_ARGS), the plugin errors or goes on; it never panics.
func FuzzParse(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","agentSocket":"/s","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.3/24"}]}}`),
		"IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=server;K8S_POD_UID=u")
	f.Add([]byte(`{"cniVersion":"0.3.1","prevResult":{"ips":[{"version":"4","address":"10.0.0.1/8"}]}}`), "K8S_POD_NAME=a=b")
	f.Add([]byte(`{}`), "")
	f.Fuzz(func(t *testing.T, stdin []byte, cniArgs string) {
		conf, ev, err := parse(&skel.CmdArgs{StdinData: stdin, Args: cniArgs, ContainerID: "c", Netns: "/n", IfName: "eth0"})
		if err != nil {
			return
		}
		if ev == nil || conf.AgentSocket == "" {
			t.Fatalf("parse succeeded without an event or a socket: %+v %+v", conf, ev)
		}
		_, _ = prevResult(conf)
	})
}
