package identity

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a goroutine outlives them
// (goleak itself: internal/testutil imports this package).
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
