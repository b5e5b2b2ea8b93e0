// Command ambit is the Ambit node proxy and its tools. It only parses flags
// and wires packages together; the work happens in internal/.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/ambitmesh/ambit/internal/cni"
	"github.com/spf13/cobra"
)

func main() {
	// Run under the CNI plugin's name (the node agent installs this binary
	// as /opt/cni/bin/ambit-cni), it is the plugin: the CNI protocol on
	// its environment and stdin, no flags.
	if filepath.Base(os.Args[0]) == cni.PluginType {
		cni.Main()
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ambit:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "ambit",
		Short:         "Ambit: an ambient-mesh node proxy in Go (HBONE, SPIFFE identities, L4 policy)",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newVersionCmd(), newCACmd(), newDemoCmd(), newProxyCmd(), newLabCmd(), newNodeAgentCmd(), newTraceCmd(), newControlCmd(), newBenchCmd())
	return root
}
