// The kernel's two boot-relative clocks, turned into wall-clock epochs.
// bpf_ktime_get_ns, which stamps every ring-buffer event, reads
// CLOCK_MONOTONIC; the load time in a program's info counts on
// CLOCK_BOOTTIME, which also runs while the machine is suspended. Adding a
// timestamp to the wrong epoch is off by the time spent suspended.
package events

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// MonotonicEpoch is the wall-clock time at which CLOCK_MONOTONIC, which
// bpf_ktime_get_ns and so every event timestamp reads, was zero.
func MonotonicEpoch() (time.Time, error) { return clockEpoch(unix.CLOCK_MONOTONIC) }

// BoottimeEpoch is the wall-clock time at which CLOCK_BOOTTIME, which a
// program's load time (bpf_prog_info.load_time) counts on, was zero.
func BoottimeEpoch() (time.Time, error) { return clockEpoch(unix.CLOCK_BOOTTIME) }

func clockEpoch(clock int32) (time.Time, error) {
	d, err := clockNow(clock)
	if err != nil {
		return time.Time{}, err
	}
	return time.Now().Add(-d), nil
}

func clockNow(clock int32) (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(clock, &ts); err != nil {
		return 0, fmt.Errorf("read clock %d: %w", clock, err)
	}
	return time.Duration(ts.Nano()), nil
}
