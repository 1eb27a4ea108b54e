package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// standinProcess is a stand-in serving in a process of its own: the direct POSTs go there, so that
// like the engine's they cross from one process to another, as every request to ev.energy does.
type standinProcess struct {
	url    string
	cmd    *exec.Cmd
	log    string // its log file: a pipe would have this process copy a line per request
	exited chan struct{}
}

// startStandinProcess serves a stand-in with the direct POSTs' client from bin, the stand-in's own
// binary (cmd/evenergy-standin), and waits until it accepts connections.
func startStandinProcess(ctx context.Context, bin string) (*standinProcess, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	logFile, err := os.CreateTemp("", "evenergy-bench-standin-*.log")
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	p := &standinProcess{url: "http://" + addr, log: logFile.Name(), exited: make(chan struct{})}
	p.cmd = exec.Command(bin, "-listen", addr,
		"-client-id", directClient, "-client-secret", clientSecret, "-scopes", strings.Join(standinScopes, " "))
	p.cmd.Stdout, p.cmd.Stderr = logFile, logFile
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	deadline := time.Now().Add(60 * time.Second) // generous: a cold, loaded machine
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return p, nil
		}
		select {
		case <-p.exited:
			err = fmt.Errorf("the stand-in process exited before serving; its log:\n%s", p.logTail())
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(50 * time.Millisecond):
			if time.Now().Before(deadline) {
				continue
			}
			err = fmt.Errorf("the stand-in process did not serve within a minute; its log:\n%s", p.logTail())
		}
		p.stop()
		return nil, err
	}
}

func (p *standinProcess) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
	_ = os.Remove(p.log)
}

// logTail is the end of the stand-in's log, for a failure's message.
func (p *standinProcess) logTail() string {
	data, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}
