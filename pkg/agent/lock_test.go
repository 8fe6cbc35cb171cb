package agent

import (
	"errors"
	"testing"

	"github.com/patchcord/patchcord/pkg/datapath/datapathtest"
)

func TestAgentLock(t *testing.T) {
	root := datapathtest.MustOpen(t).Root
	if running, err := Running(root); err != nil || running {
		t.Fatalf("before lock: running=%v err=%v", running, err)
	}
	unlock, err := Lock(root)
	if err != nil {
		t.Fatal(err)
	}
	if running, err := Running(root); err != nil || !running {
		t.Errorf("while locked: running=%v err=%v", running, err)
	}
	if _, err := Lock(root); !errors.Is(err, ErrAgentRunning) {
		t.Errorf("second agent: got %v, want ErrAgentRunning", err)
	}
	unlock()
	if running, _ := Running(root); running {
		t.Error("after unlock: still running")
	}
}
