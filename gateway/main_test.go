package gateway

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if they leave goroutines behind. Run
// with squatTable in the environment the binary is a helper process of a
// test instead.
func TestMain(m *testing.M) {
	if table := os.Getenv(squatTable); table != "" {
		squatter(table)
		return
	}
	goleak.VerifyTestMain(m)
}
