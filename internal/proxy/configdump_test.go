package proxy

import (
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/ambient"
	"github.com/ambitmesh/ambit/internal/identity"
	"github.com/ambitmesh/ambit/internal/socks5"
)

// The test's own reading of ztunnel's schema: the keys istioctl and
// ztunnel's dashboards read, spelled as ztunnel spells them.
type testDump struct {
	Workloads []struct {
		UID, Name, Namespace, Protocol, NetworkMode, Status, ServiceAccount, TrustDomain, CanonicalName string
		WorkloadIPs                                                                                     []string `json:"workloadIps"`
		Services                                                                                        []string
	}
	Services []struct {
		Name, Namespace, Hostname string
		VIPs                      []string `json:"vips"`
		Ports                     map[string]uint16
		Endpoints                 map[string]struct {
			WorkloadUID string `json:"workloadUid"`
			Service     string
			Port        map[string]uint16
			Status      string
		}
		SubjectAltNames []string `json:"subjectAltNames"`
	}
	Policies []struct {
		Name, Namespace, Scope, Action string
		Rules                          [][][]map[string]json.RawMessage
	}
	Certificates []struct {
		Identity, State string
		CertChain       []struct{ PEM, SerialNumber, ValidFrom, ExpirationTime string } `json:"certChain"`
		RootCerts       []struct{ PEM, SerialNumber, ValidFrom, ExpirationTime string } `json:"rootCerts"`
	}
	WorkloadState map[string]struct {
		State string
		Info  struct{ Name, Namespace, ServiceAccount string }
		Conns struct {
			Inbound []struct {
				Src, ActualDst, Protocol string
				OriginalDst              *string `json:"originalDst"`
			}
			Outbound []struct {
				Src, ActualDst, Protocol string
				OriginalDst              *string `json:"originalDst"`
			}
		} `json:"connections"`
	} `json:"workloadState"`
	Config struct{ ProxyMode, Workload string } `json:"config"`
}

func TestConfigDumpInZtunnelSchema(t *testing.T) {
	policy := "policies:\n- name: deny-other\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n" +
		"  - - - principals: [!Exact \"cluster.local/ns/other/sa/x\", !Prefix \"cluster.local/ns/evil/\"]\n" +
		"        notSourceIps: [\"127.0.0.0/8\"]\n        destinationPorts: [9999]\n"
	m := newMesh(t, "", policy)
	c, code, err := m.socks(m.serverIP.String(), 8080)
	if err != nil || code != socks5.Succeeded {
		t.Fatalf("code %d, %v", code, err)
	}
	defer c.Close()
	buf := make([]byte, 4)
	if _, err := c.Write([]byte("live")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil { // the connection is relayed and stays open
		t.Fatal(err)
	}
	raw := get(t, "http://"+netip.AddrPortFrom(m.serverIP, ambient.AdminPort).String()+"/config_dump")
	if strings.Contains(raw, "PRIVATE KEY") || strings.Contains(strings.ToLower(raw), `"key"`) {
		t.Fatal("config_dump exposes a private key")
	}
	var d testDump
	if err := json.Unmarshal([]byte(raw), &d); err != nil {
		t.Fatalf("config_dump is not JSON: %v\n%s", err, raw)
	}
	if d.Config.ProxyMode != "Dedicated" || d.Config.Workload != "default/server" {
		t.Errorf("config: %+v", d.Config)
	}

	if len(d.Workloads) != 2 || d.Workloads[0].UID != "test//client" || d.Workloads[1].UID != "test//server" {
		t.Fatalf("workloads (sorted by uid): %+v", d.Workloads)
	}
	srv := d.Workloads[1]
	if srv.Protocol != "HBONE" || srv.NetworkMode != "Standard" || srv.Status != "Healthy" || srv.TrustDomain != "cluster.local" ||
		srv.ServiceAccount != "server" || srv.CanonicalName != "server" || len(srv.WorkloadIPs) != 1 || srv.WorkloadIPs[0] != m.serverIP.String() ||
		len(srv.Services) != 1 || srv.Services[0] != "default/echo.default.svc.cluster.local" {
		t.Errorf("server workload: %+v", srv)
	}

	if len(d.Services) != 1 {
		t.Fatalf("services: %+v", d.Services)
	}
	svc := d.Services[0]
	ep, ok := svc.Endpoints["test//server"]
	if svc.Hostname != "echo.default.svc.cluster.local" || len(svc.VIPs) != 1 || !strings.HasPrefix(svc.VIPs[0], "/10.96.") ||
		svc.Ports["80"] != 8080 || svc.SubjectAltNames == nil || len(svc.Endpoints) != 1 || !ok ||
		ep.WorkloadUID != "test//server" || ep.Service != "default/echo.default.svc.cluster.local" || ep.Port["80"] != 8080 || ep.Status != "Healthy" {
		t.Errorf("service: %+v", svc)
	}

	if len(d.Policies) != 1 || d.Policies[0].Action != "Deny" || d.Policies[0].Scope != "Namespace" || len(d.Policies[0].Rules) != 1 {
		t.Fatalf("policies: %+v", d.Policies)
	}
	match := d.Policies[0].Rules[0][0][0]
	for key, want := range map[string]string{
		"principals":       `[{"Exact":"cluster.local/ns/other/sa/x"},{"Prefix":"cluster.local/ns/evil/"}]`,
		"notSourceIps":     `["127.0.0.0/8"]`,
		"destinationPorts": `[9999]`,
	} {
		if got := compact(t, match[key]); got != want {
			t.Errorf("policy match %s: %s, want %s", key, got, want)
		}
	}
	if len(match) != 3 {
		t.Errorf("empty match fields are not omitted: %v", match)
	}

	if len(d.Certificates) != 1 {
		t.Fatalf("certificates: %+v", d.Certificates)
	}
	crt := d.Certificates[0]
	if crt.Identity != "spiffe://cluster.local/ns/default/sa/server" || crt.State != "Available" || len(crt.CertChain) < 1 || len(crt.RootCerts) != 1 {
		t.Fatalf("certificate: %+v", crt)
	}
	for i, z := range append(crt.CertChain, crt.RootCerts...) {
		text, err := base64.StdEncoding.DecodeString(z.PEM)
		if err != nil {
			t.Fatalf("cert %d: pem is not base64: %v", i, err)
		}
		blk, _ := pem.Decode(text)
		if blk == nil || blk.Type != "CERTIFICATE" {
			t.Fatalf("cert %d: not a PEM certificate: %q", i, text)
		}
		x, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if x.SerialNumber.String() != z.SerialNumber || x.NotAfter.UTC().Format(time.RFC3339) != z.ExpirationTime ||
			x.NotBefore.UTC().Format(time.RFC3339) != z.ValidFrom {
			t.Errorf("cert %d: serial %s %s..%s, the certificate says %s %s..%s", i, z.SerialNumber, z.ValidFrom, z.ExpirationTime,
				x.SerialNumber, x.NotBefore.UTC().Format(time.RFC3339), x.NotAfter.UTC().Format(time.RFC3339))
		}
		if i == 0 && x.URIs[0].String() != crt.Identity {
			t.Errorf("the leaf is %s, not %s", x.URIs[0], crt.Identity)
		}
	}

	st, ok := d.WorkloadState["test//server"]
	if !ok || st.State != "Up" || st.Info.Name != "server" || st.Info.ServiceAccount != "server" || st.Conns.Outbound == nil {
		t.Fatalf("workloadState: %+v", d.WorkloadState)
	}
	if len(st.Conns.Inbound) != 1 || st.Conns.Inbound[0].Protocol != "HBONE" || st.Conns.Inbound[0].ActualDst != netip.AddrPortFrom(m.serverIP, 8080).String() ||
		!strings.HasPrefix(st.Conns.Inbound[0].Src, m.clientIP.String()+":") {
		t.Errorf("inbound connections of the server: %+v", st.Conns.Inbound)
	}

	// The client's proxy shows the same connection outbound: to the
	// server's 8080, carried to its 15008 over HBONE.
	var cd testDump
	if err := json.Unmarshal([]byte(get(t, "http://"+netip.AddrPortFrom(m.clientIP, ambient.AdminPort).String()+"/config_dump")), &cd); err != nil {
		t.Fatal(err)
	}
	out := cd.WorkloadState["test//client"].Conns.Outbound
	if len(out) != 1 || out[0].Protocol != "HBONE" || out[0].OriginalDst == nil || *out[0].OriginalDst != netip.AddrPortFrom(m.serverIP, 8080).String() ||
		out[0].ActualDst != netip.AddrPortFrom(m.serverIP, ambient.ZtunnelInboundPort).String() || out[0].Src != c.LocalAddr().String() {
		t.Errorf("outbound connections of the client: %+v", out)
	}
}

func compact(t *testing.T, m json.RawMessage) string {
	t.Helper()
	var v any
	if err := json.Unmarshal(m, &v); err != nil {
		return "(" + err.Error() + ")"
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// A certificate not fetched yet, and one whose fetch failed, as ztunnel
// shows them (istioctl prints "Initializing" and "Unavailable").
func TestConfigDumpCertificateStates(t *testing.T) {
	id := identity.ID{TrustDomain: "cluster.local", Namespace: "default", ServiceAccount: "a"}
	pending := dumpCerts(identity.CertState{ID: id})
	failed := dumpCerts(identity.CertState{ID: id, Err: errors.New("ca: connection refused")})
	if pending.State != "Initializing" || failed.State != "Unavailable: ca: connection refused" ||
		pending.CertChain == nil || failed.RootCerts == nil || len(pending.CertChain)+len(failed.CertChain) != 0 {
		t.Errorf("initializing %+v, failed %+v", pending, failed)
	}
}
