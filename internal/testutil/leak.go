package testutil

import (
	"fmt"
	"net/http"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// VerifyNoLeaks runs a package's tests (call it from TestMain) and fails
// them if a goroutine outlives them: every goroutine has an owner and an
// end. The HTTP client's idle keep-alive connections, the tests' probes of
// readiness and metrics, are closed first: they are the client's, not a
// leak of the code under test.
func VerifyNoLeaks(m *testing.M) {
	code := m.Run()
	if code == 0 {
		http.DefaultClient.CloseIdleConnections()
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}
