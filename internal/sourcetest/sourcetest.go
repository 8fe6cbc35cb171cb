// Package sourcetest runs a node source in a test: anything whose Run sends
// sets on a channel until its context ends (nodes.File, nodes.Kube), read one
// send at a time, and stopped when the test ends. It is generic rather than
// typed on pkg/nodes, so that the tests inside that package can use it too.
package sourcetest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// Timeout bounds each wait: for a send, for a watch, for Run to return.
const Timeout = 10 * time.Second

// Source is a source running until its test ends.
type Source[T any] struct {
	// Log, when set, is shown with the failures of Next and of the final
	// stop: what the source logged.
	Log fmt.Stringer

	updates chan T
	done    chan error
}

// Start runs run until tb ends; then its context is cancelled, and run must
// return nil within Timeout.
func Start[T any](tb testing.TB, run func(context.Context, chan<- T) error) *Source[T] {
	tb.Helper()
	s := &Source[T]{updates: make(chan T), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { s.done <- run(ctx, s.updates) }()
	tb.Cleanup(func() {
		cancel()
		select {
		case err := <-s.done:
			if err != nil {
				tb.Errorf("Run: %v%s", err, s.log())
			}
		case <-time.After(Timeout):
			tb.Errorf("Run did not return after cancel%s", s.log())
		}
	})
	return s
}

// StartWatching is Start for a source that watches resource on client. It
// returns once the source's watch has started, so that objects the test
// changes afterwards reach it as events: the fake clientset drops what
// happens between a list and its watch.
func StartWatching[T any](tb testing.TB, client *fake.Clientset, resource string, run func(context.Context, chan<- T) error) *Source[T] {
	tb.Helper()
	watching := make(chan struct{})
	var once sync.Once
	client.PrependWatchReactor(resource, func(k8stesting.Action) (bool, watch.Interface, error) {
		once.Do(func() { close(watching) })
		return false, nil, nil // the default reactor serves the watch
	})
	s := Start(tb, run)
	select {
	case <-watching:
	case err := <-s.done:
		tb.Fatalf("Run returned before watching %s: %v", resource, err)
	case <-time.After(Timeout):
		tb.Fatalf("the source never started watching %s", resource)
	}
	return s
}

// Updates is what the source sends, for a test that waits on more than one send.
func (s *Source[T]) Updates() <-chan T { return s.updates }

// Next returns the source's next send, failing tb when none comes within Timeout.
func (s *Source[T]) Next(tb testing.TB) T {
	tb.Helper()
	select {
	case u := <-s.updates:
		return u
	case <-time.After(Timeout):
		tb.Fatalf("nothing sent within %v%s", Timeout, s.log())
		var zero T
		return zero
	}
}

func (s *Source[T]) log() string {
	if s.Log == nil {
		return ""
	}
	return "; log:\n" + s.Log.String()
}
