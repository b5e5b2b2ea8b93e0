package kubenode

import (
	"testing"

	"github.com/ambitmesh/ambit/internal/testutil"
)

// TestMain fails the package's tests if a goroutine outlives them.
func TestMain(m *testing.M) { testutil.VerifyNoLeaks(m) }
