// Command pause is the pod sandbox ("infra") container of the weft test lab: it holds the pod's
// namespaces open, reaps orphaned children (it is PID 1 of the pod when the PID namespace is
// shared) and exits on SIGINT/SIGTERM. Same job as Kubernetes' pause.c, in a few lines of Go.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
