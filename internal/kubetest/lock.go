package kubetest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// machine is this process's hold on the machine's test clusters. Clusters
// of two processes at once (`go test ./...` runs packages in parallel)
// share the host paths the nodes bind over: one Down's removal of a
// directory it made detaches the other cluster's mounts there (its
// containerd's content store vanished mid-test). So the first UpCluster of
// a process takes an exclusive lock on the machine, held until the process
// ends; another process's UpCluster waits for it. It is process-wide
// state by nature: the lock is the process's.
var machine struct {
	once sync.Once
	f    *os.File
	err  error
}

// lockMachine takes the machine lock once per process, waiting (ctx, and 15
// minutes at most: a stuck holder, not a speed check) for another holder.
func lockMachine(ctx context.Context) error {
	machine.once.Do(func() {
		if err := os.MkdirAll(ClusterRoot, 0o755); err != nil {
			machine.err = err
			return
		}
		f, err := os.OpenFile(filepath.Join(ClusterRoot, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			machine.err = err
			return
		}
		deadline := time.Now().Add(15 * time.Minute)
		for {
			err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
			if err == nil {
				machine.f = f // kept open: the lock lasts as long as the process
				return
			}
			if err != syscall.EWOULDBLOCK || time.Now().After(deadline) || ctx.Err() != nil {
				f.Close()
				machine.err = fmt.Errorf("kubetest: the machine's cluster lock %s (another test process runs clusters): %w", f.Name(), err)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
	return machine.err
}
