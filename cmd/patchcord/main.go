// Command patchcord is the node agent (`patchcord agent`) and the debugging
// CLI (`patchcord bpf ...`) of the patchcord datapath.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cilium/ebpf"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			fmt.Fprintf(os.Stderr, "%+v\n", ve)
		}
		slog.Error(err.Error())
		os.Exit(1)
	}
}
