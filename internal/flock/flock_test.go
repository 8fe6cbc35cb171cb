package flock_test

import (
	"errors"
	"testing"

	"github.com/patchcord/patchcord/internal/flock"
)

// Two shared holders, as two trace monitors: neither can convert to
// exclusive while the other holds on, the last one can, and Held follows.
func TestSharedThenExclusive(t *testing.T) {
	dir := t.TempDir()
	held := func(want bool) {
		t.Helper()
		if got, err := flock.Held(dir); err != nil || got != want {
			t.Errorf("Held = %v, %v; want %v", got, err, want)
		}
	}
	held(false)
	a, err := flock.Take(dir, flock.Shared)
	if err != nil {
		t.Fatal(err)
	}
	b, err := flock.Take(dir, flock.Shared)
	if err != nil {
		t.Fatal(err)
	}
	held(true)
	if err := a.Convert(flock.Exclusive | flock.NoWait); !errors.Is(err, flock.ErrHeld) {
		t.Errorf("convert with another holder: %v, want EWOULDBLOCK", err)
	}
	a.Unlock()
	if err := b.Convert(flock.Exclusive | flock.NoWait); err != nil {
		t.Errorf("convert as the last holder: %v", err)
	}
	if _, err := flock.Hold(dir, flock.Exclusive|flock.NoWait); !errors.Is(err, flock.ErrHeld) {
		t.Errorf("Hold while held exclusively: %v, want EWOULDBLOCK", err)
	}
	b.Unlock()
	held(false)
	if _, err := flock.Take(dir+"/missing", flock.Shared); err == nil {
		t.Error("Take of a missing path succeeded")
	}
}
