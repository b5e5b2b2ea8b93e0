package testutil

import (
	"context"
	"testing"
	"time"

	"github.com/ambitmesh/ambit/internal/identity"
)

// CA makes a fresh self-signed CA, valid for 24 h, in a directory that
// goes with the test. identity's own tests cannot use it (an import cycle).
func CA(t testing.TB) *identity.CA {
	t.Helper()
	ca, err := identity.InitCA(t.TempDir(), "test", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// Issue has ca sign a certificate for id, with the CA's default TTL and a
// fresh key: one a certificate manager would not hold (an expired one,
// with ca.Now set back, or one of another CA).
func Issue(t testing.TB, ca *identity.CA, id identity.ID) *identity.Certificate {
	t.Helper()
	c, err := (&identity.LocalIssuer{CA: ca}).Issue(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
