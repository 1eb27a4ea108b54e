package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/api"
)

// devVault is the `vault server -dev` this program started.
type devVault struct {
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the server process has exited
	dir     string        // holds the server's log
	client  *api.Client   // root client
	version string
}

// startVault starts a dev server that registers the plugins in pluginDir, and waits until it serves.
func startVault(ctx context.Context, bin, pluginDir string, clients int) (*devVault, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "evenergy-bench-")
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "vault.log"))
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	v := &devVault{dir: dir, exited: make(chan struct{})}
	v.cmd = exec.Command(bin, "server", "-dev", "-dev-root-token-id=root", "-dev-no-store-token",
		"-dev-listen-address="+addr, "-dev-plugin-dir="+pluginDir)
	v.cmd.Stdout, v.cmd.Stderr = logFile, logFile
	if err := v.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		_ = v.cmd.Wait()
		close(v.exited)
	}()

	cfg := api.DefaultConfig()
	cfg.Address = "http://" + addr
	cfg.MaxRetries = 0 // a failed read fails the run; a retry would hide inside a timed read
	// One idle connection per client, so that bursts do not pay for new connections.
	cfg.HttpClient.Transport.(*http.Transport).MaxIdleConnsPerHost = clients
	if v.client, err = api.NewClient(cfg); err != nil {
		v.stop()
		return nil, err
	}
	v.client.SetToken("root")
	if err := v.waitHealthy(ctx, 60*time.Second); err != nil {
		err = fmt.Errorf("%w\nVault's log ends:\n%s", err, v.logTail(40))
		v.stop()
		return nil, err
	}
	return v, nil
}

func (v *devVault) waitHealthy(ctx context.Context, within time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		health, err := v.client.Sys().HealthWithContext(ctx)
		if err == nil && health.Initialized && !health.Sealed {
			v.version = health.Version
			return nil
		}
		select {
		case <-v.exited:
			return errors.New("the Vault server exited")
		case <-ctx.Done():
			return fmt.Errorf("the Vault server did not come up within %s: %v", within, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop shuts the server down; an interrupt, unlike a kill, makes it stop its plugin processes too.
func (v *devVault) stop() {
	_ = v.cmd.Process.Signal(os.Interrupt)
	select {
	case <-v.exited:
	case <-time.After(20 * time.Second):
		_ = v.cmd.Process.Kill()
		<-v.exited
	}
	_ = os.RemoveAll(v.dir)
}

// logTail is the end of the server's log, for failures.
func (v *devVault) logTail(lines int) string {
	log, err := os.ReadFile(filepath.Join(v.dir, "vault.log"))
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(log), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}

// pluginRSS is the resident memory (VmRSS, bytes) of the plugin process this server runs from exe.
func (v *devVault) pluginRSS(exe string) (int64, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	var found []int64
	for _, p := range procs {
		if link, err := os.Readlink(filepath.Join("/proc", p.Name(), "exe")); err != nil || link != exe {
			continue
		}
		status, err := os.ReadFile(filepath.Join("/proc", p.Name(), "status"))
		if err != nil {
			continue // it has exited
		}
		fields := map[string]string{}
		for line := range bytes.Lines(status) {
			name, value, _ := strings.Cut(string(line), ":")
			fields[name] = strings.TrimSpace(value)
		}
		if fields["PPid"] != strconv.Itoa(v.cmd.Process.Pid) {
			continue // another Vault's plugin
		}
		kB, err := strconv.ParseInt(strings.TrimSuffix(fields["VmRSS"], " kB"), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS of process %s: %v", p.Name(), err)
		}
		found = append(found, kB*1024)
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("found %d processes of %s started by Vault, want 1", len(found), exe)
	}
	return found[0], nil
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
