// Flows that a disruption (an agent killed, an upgrade) must not disturb,
// from sockets this process opens in the pods' namespaces: UDP flows of
// numbered datagrams whose receiver knows every number that did not arrive,
// and established TCP connections that echo numbered messages. Unlike an
// iperf3 run they have no fixed length: they run until the test has seen
// what it waits for, however slow the machine (an emulated guest) is.
package e2e

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/patchcord/patchcord/internal/lab"
)

// flowInterval is how often each flow sends: 500 datagrams and round trips a
// second, few enough that a busy 2-CPU machine never overflows a socket
// buffer, many enough that any gap of the datapath shows.
const flowInterval = 2 * time.Millisecond

// Flows is a set of UDP and TCP flows between pods, checked together.
type Flows struct {
	udp []*udpFlow
	tcp []*tcpFlow
}

// NewFlows is an empty set; the flows it starts stop with the test.
func NewFlows() *Flows { return &Flows{} }

// UDP starts a flow of numbered datagrams from one pod to another.
func (fs *Flows) UDP(t *testing.T, name string, from, to *lab.Pod, port int) {
	t.Helper()
	f := &udpFlow{name: name, stop: make(chan struct{}), sendDone: make(chan struct{}), got: make(map[uint64]bool)}
	dst := netip.AddrPortFrom(to.IP, uint16(port))
	err := errors.Join(
		inNetNS(to, func() (err error) { f.dst, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(dst)); return err }),
		inNetNS(from, func() (err error) { f.src, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst)); return err }))
	if err != nil {
		t.Fatalf("udp flow %s: %v", name, err)
	}
	f.wg.Go(f.receive)
	f.wg.Go(f.send)
	t.Cleanup(f.close)
	fs.udp = append(fs.udp, f)
}

// TCP opens a connection from one pod to another and starts its round trips.
func (fs *Flows) TCP(t *testing.T, name string, from, to *lab.Pod, port int) {
	t.Helper()
	f := &tcpFlow{name: name, stop: make(chan struct{})}
	addr := netip.AddrPortFrom(to.IP, uint16(port)).String()
	err := inNetNS(to, func() (err error) { f.ln, err = net.Listen("tcp", addr); return err })
	if err == nil {
		f.wg.Go(f.echo)
		err = inNetNS(from, func() (err error) { f.client, err = net.DialTimeout("tcp", addr, 5*time.Second); return err })
	}
	if err != nil {
		t.Fatalf("tcp flow %s: %v", name, err)
	}
	f.wg.Go(f.run)
	t.Cleanup(f.close)
	fs.tcp = append(fs.tcp, f)
}

// WaitProgress waits until every flow has moved by n datagrams or round
// trips from now: traffic that crossed whatever happened before the call
// counts for nothing. A TCP error fails the test at once.
func (fs *Flows) WaitProgress(t *testing.T, ctx context.Context, n int) {
	t.Helper()
	from := make(map[any]int, len(fs.udp)+len(fs.tcp))
	for _, f := range fs.udp {
		from[f] = f.received()
	}
	for _, f := range fs.tcp {
		from[f], _ = f.progress()
	}
	// n packets take n*flowInterval; the rest is room for a slow machine.
	wctx, cancel := context.WithTimeout(ctx, slowTimeout(20*time.Second+time.Duration(n)*flowInterval))
	defer cancel()
	err := lab.WaitFor(wctx, "traffic", func(context.Context) error {
		for _, f := range fs.udp {
			if got := f.received(); got < from[f]+n {
				return fmt.Errorf("udp %s: %d datagrams arrived, want %d", f.name, got, from[f]+n)
			}
		}
		for _, f := range fs.tcp {
			rounds, err := f.progress()
			if err != nil {
				return fmt.Errorf("tcp %s: %w: %w", f.name, err, ErrExited)
			}
			if rounds < from[f]+n {
				return fmt.Errorf("tcp %s: %d round trips, want %d", f.name, rounds, from[f]+n)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Finish stops every flow and fails the test for each datagram lost and
// each TCP error.
func (fs *Flows) Finish(t *testing.T, during string) {
	t.Helper()
	for _, f := range fs.udp {
		sent, lost, err := f.finish()
		t.Logf("udp %s: %d datagrams sent, %d lost", f.name, sent, len(lost))
		if err != nil || len(lost) > 0 {
			t.Errorf("udp %s %s: %d of %d datagrams lost (first %v), send error %v", f.name, during, len(lost), sent, lost[:min(len(lost), 10)], err)
		}
	}
	for _, f := range fs.tcp {
		rounds, err := f.progress()
		f.close()
		t.Logf("tcp %s: %d round trips", f.name, rounds)
		if err != nil {
			t.Errorf("tcp %s %s: %v", f.name, during, err)
		}
	}
}

// inNetNS runs f in the network namespace of p; sockets f opens stay there.
func inNetNS(p *lab.Pod, f func() error) error {
	return ns.WithNetNSPath(p.NSPath, func(ns.NetNS) error { return f() })
}

// udpFlow sends datagrams numbered 0, 1, ... from one pod to another.
type udpFlow struct {
	name     string
	src, dst *net.UDPConn
	stop     chan struct{}
	sendDone chan struct{}
	wg       sync.WaitGroup

	mu   sync.Mutex
	sent uint64
	got  map[uint64]bool
	err  error
}

func (f *udpFlow) send() {
	defer close(f.sendDone)
	buf := make([]byte, 64)
	paced(f.stop, func(seq uint64) bool {
		binary.BigEndian.PutUint64(buf, seq)
		_, err := f.src.Write(buf)
		f.mu.Lock()
		defer f.mu.Unlock()
		f.sent = seq + 1
		if err != nil && f.err == nil {
			f.err = fmt.Errorf("send datagram %d: %w", seq, err)
		}
		return true
	})
}

// paced calls each with 0, 1, ... once every flowInterval until stop is
// closed or each returns false.
func paced(stop <-chan struct{}, each func(seq uint64) bool) {
	tick := time.NewTicker(flowInterval)
	defer tick.Stop()
	for seq := uint64(0); ; seq++ {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		if !each(seq) {
			return
		}
	}
}

func (f *udpFlow) receive() {
	buf := make([]byte, 64)
	for {
		n, err := f.dst.Read(buf)
		if err != nil {
			return // closed
		}
		if n >= 8 {
			f.mu.Lock()
			f.got[binary.BigEndian.Uint64(buf)] = true
			f.mu.Unlock()
		}
	}
}

// arrived reports whether datagram seq arrived.
func (f *udpFlow) arrived(seq uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.got[seq]
}

// received is how many datagrams arrived so far.
func (f *udpFlow) received() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.got)
}

// finish stops sending, lets the last datagrams arrive and returns how many
// were sent and the numbers lost after the first that arrived (the first
// ones may wait for the neighbour entries of a fresh lab).
func (f *udpFlow) finish() (sent uint64, lost []uint64, err error) {
	stopFlow(f.stop)
	<-f.sendDone // f.sent is final
	// The last datagram is the last to arrive; a datagram not there when
	// the wait is over is lost (one second is long past any queue in the
	// lab, more in an emulated guest).
	for deadline := time.Now().Add(slowTimeout(time.Second)); time.Now().Before(deadline) && f.sent > 0 && !f.arrived(f.sent-1); {
		time.Sleep(5 * time.Millisecond)
	}
	f.close()
	f.mu.Lock()
	defer f.mu.Unlock()
	first := uint64(0)
	for first < f.sent && !f.got[first] {
		first++
	}
	for seq := first; seq < f.sent; seq++ {
		if !f.got[seq] {
			lost = append(lost, seq)
		}
	}
	return f.sent, lost, f.err
}

func (f *udpFlow) close() {
	stopFlow(f.stop)
	f.src.Close()
	f.dst.Close()
	f.wg.Wait()
}

// tcpFlow is one TCP connection between two pods; the client sends a
// numbered message every flowInterval and the server echoes it.
type tcpFlow struct {
	name   string
	ln     net.Listener
	client net.Conn
	stop   chan struct{}
	wg     sync.WaitGroup

	mu     sync.Mutex
	rounds int
	err    error
}

func (f *tcpFlow) echo() {
	c, err := f.ln.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	io.Copy(c, c)
}

func (f *tcpFlow) run() {
	out, in := make([]byte, 8), make([]byte, 8)
	paced(f.stop, func(seq uint64) bool {
		binary.BigEndian.PutUint64(out, seq)
		f.client.SetDeadline(time.Now().Add(slowTimeout(5 * time.Second)))
		_, err := f.client.Write(out)
		if err == nil {
			_, err = io.ReadFull(f.client, in)
		}
		if err == nil && binary.BigEndian.Uint64(in) != seq {
			err = fmt.Errorf("echo %d, want %d", binary.BigEndian.Uint64(in), seq)
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		if err != nil {
			f.err = fmt.Errorf("round trip %d: %w", seq, err)
			return false
		}
		f.rounds++
		return true
	})
}

// progress is how many round trips the connection made so far, and its
// first error.
func (f *tcpFlow) progress() (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rounds, f.err
}

func (f *tcpFlow) close() {
	stopFlow(f.stop)
	f.ln.Close()
	f.client.Close()
	f.wg.Wait()
}

// stopFlow closes a flow's stop channel unless it is closed already.
func stopFlow(ch chan struct{}) {
	select {
	case <-ch:
	default:
		close(ch)
	}
}
