package demo

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	if err := Run(ctx, &out, Options{CADir: t.TempDir()}); err != nil {
		t.Fatalf("demo failed: %v\n%s", err, out.String())
	}
	for _, want := range []string{
		"created a self-signed root",
		"identity  spiffe://cluster.local/ns/default/sa/client",
		"TLS 1.3, TLS_AES_",
		"the server proved spiffe://cluster.local/ns/default/sa/server",
		"from spiffe://cluster.local/ns/default/sa/client (forwarded for 127.0.0.10:",
		"client app 127.0.0.10:",
		"CONNECT answered 200",
		"byte-exact",
		"rode the same connection",
		"is not the expected",
		"ok: ",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}

// Without root the lab demo says, in one sentence, what is missing.
func TestLabDemoWithoutRootSaysWhy(t *testing.T) {
	var out bytes.Buffer
	err := RunLab(&out, LabOptions{Geteuid: func() int { return 1000 }})
	if err == nil || !strings.Contains(err.Error(), "needs root: run it as root (e.g. sudo make demo)") {
		t.Fatalf("err = %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("printed before refusing: %q", out.String())
	}
}
