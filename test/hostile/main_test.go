// The hostile-pod tests run through the e2e kit: its TestMain finds this tree's binaries.
package hostile

import (
	"testing"

	"github.com/patchcord/patchcord/internal/e2e"
)

func TestMain(m *testing.M) { e2e.Main(m) }
