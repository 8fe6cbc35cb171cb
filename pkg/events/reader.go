package events

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/patchcord/patchcord/pkg/datapath"
	"golang.org/x/sys/unix"
)

// ErrClosed is returned by Read once the reader is closed.
var ErrClosed = errors.New("events reader closed")

// Reader reads the datapath's event ring buffer.
//
// A BPF ring buffer has one consumer position, shared by everyone who maps
// it: two readers at once each get part of the events, not all of them.
type Reader struct {
	rb    *ringbuf.Reader
	rec   ringbuf.Record
	since uint64 // monotonic ns; older records are skipped
}

// NewReader opens the ring buffer (datapath.Maps.Events). Events recorded
// before this call are skipped: they waited in the ring while nobody read it,
// possibly for hours, and would read as if they were happening now.
func NewReader(events *ebpf.Map) (*Reader, error) {
	since, err := clockNow(unix.CLOCK_MONOTONIC)
	if err != nil {
		return nil, err
	}
	rb, err := ringbuf.NewReader(events)
	if err != nil {
		return nil, fmt.Errorf("open event ring buffer: %w", err)
	}
	return &Reader{rb: rb, since: uint64(since)}, nil
}

// Read returns the next event, blocking until one comes, the deadline set
// with SetDeadline passes (os.ErrDeadlineExceeded) or the reader is closed
// (ErrClosed).
func (r *Reader) Read() (datapath.Event, error) {
	for {
		err := r.rb.ReadInto(&r.rec)
		if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
			return datapath.Event{}, ErrClosed
		}
		if err != nil {
			return datapath.Event{}, err
		}
		ev, err := Parse(r.rec.RawSample)
		if err != nil {
			return ev, err
		}
		if ev.TsNs < r.since {
			continue
		}
		return ev, nil
	}
}

// Pending reports whether events wait in the ring, so that a caller can
// flush its output only when it has caught up.
func (r *Reader) Pending() bool { return r.rb.AvailableBytes() > 0 }

// SetDeadline bounds how long Read blocks; the zero time removes the bound.
func (r *Reader) SetDeadline(t time.Time) { r.rb.SetDeadline(t) }

// Close releases the ring buffer and interrupts a blocked Read.
func (r *Reader) Close() error { return r.rb.Close() }

// Names resolves interface names in the caller's network namespace and
// remembers them: a monitor on a busy node sees the same few interfaces
// again and again. Names of interfaces not found are asked for again, since
// a pod's veth may appear after the monitor started.
type Names struct {
	mu    sync.Mutex
	names map[int]string
}

// Name returns the name of ifindex, or "" if there is no such interface.
func (n *Names) Name(ifindex int) string {
	if ifindex == 0 {
		return ""
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if name, ok := n.names[ifindex]; ok {
		return name
	}
	iface, err := net.InterfaceByIndex(ifindex)
	if err != nil {
		return ""
	}
	if n.names == nil {
		n.names = make(map[int]string)
	}
	n.names[ifindex] = iface.Name
	return iface.Name
}
