package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/raftconfig"
)

// vaultServer is a Vault server this program started: a dev server (in-memory storage) or a
// single-node Raft one.
type vaultServer struct {
	storage   string // "inmem" or "raft"
	cmd       *exec.Cmd
	exited    chan struct{} // closed when the server process has exited
	dir       string        // holds the server's log, and on Raft its configuration and data
	client    *api.Client   // root client
	unsealKey string        // Raft only: the one key share
	version   string
}

// startDevVault starts a dev server that registers the plugins in pluginDir, and waits until it serves.
func startDevVault(ctx context.Context, bin, pluginDir string, clients int) (*vaultServer, error) {
	return startVault(ctx, bin, "inmem", clients, func(dir, addr string) ([]string, error) {
		return []string{"-dev", "-dev-root-token-id=root", "-dev-no-store-token",
			"-dev-listen-address=" + addr, "-dev-plugin-dir=" + pluginDir}, nil
	})
}

// startRaftVault starts a single-node Raft server with its data in a new temporary directory,
// initializes it with one key share, unseals it, waits until it is active and registers the
// plugins, binaries in pluginDir, in its catalog by their sha256.
func startRaftVault(ctx context.Context, bin, pluginDir string, clients int, plugins ...string) (*vaultServer, error) {
	v, err := startVault(ctx, bin, "raft", clients, func(dir, addr string) ([]string, error) {
		clusterAddr, err := freeLoopbackAddr()
		if err != nil {
			return nil, err
		}
		data := filepath.Join(dir, "raft")
		if err := os.Mkdir(data, 0o700); err != nil {
			return nil, err
		}
		config := raftconfig.Node{DataDir: data, NodeID: "bench", Addr: addr, ClusterAddr: clusterAddr, PluginDir: pluginDir}.HCL()
		if err := os.WriteFile(filepath.Join(dir, "vault.hcl"), []byte(config), 0o600); err != nil {
			return nil, err
		}
		return []string{"-config=" + filepath.Join(dir, "vault.hcl")}, nil
	})
	if err != nil {
		return nil, err
	}
	if err := v.initialize(ctx, pluginDir, plugins); err != nil {
		err = fmt.Errorf("%w\nVault's log ends:\n%s", err, v.logTail(40))
		v.stop()
		return nil, err
	}
	return v, nil
}

// initialize initializes a Raft server with one key share, unseals it and registers the plugins.
func (v *vaultServer) initialize(ctx context.Context, pluginDir string, plugins []string) error {
	init, err := v.client.Sys().InitWithContext(ctx, &api.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		return fmt.Errorf("init: %w", err)
	}
	v.client.SetToken(init.RootToken)
	v.unsealKey = init.KeysB64[0]
	if err := v.unseal(ctx); err != nil {
		return err
	}
	if err := v.waitActive(ctx, 60*time.Second); err != nil {
		return err
	}
	for _, name := range plugins {
		binary, err := os.ReadFile(filepath.Join(pluginDir, name))
		if err != nil {
			return err
		}
		if err := v.client.Sys().RegisterPluginWithContext(ctx, &api.RegisterPluginInput{
			Name: name, Type: api.PluginTypeSecrets, Command: name, SHA256: fmt.Sprintf("%x", sha256.Sum256(binary)),
		}); err != nil {
			return fmt.Errorf("register %s: %w", name, err)
		}
	}
	return nil
}

// unseal hands a Raft server its key share; it becomes active, and serves, some time later.
func (v *vaultServer) unseal(ctx context.Context) error {
	if _, err := v.client.Sys().UnsealWithContext(ctx, v.unsealKey); err != nil {
		return fmt.Errorf("unseal: %w", err)
	}
	return nil
}

// startVault starts `vault server` with the arguments args gives for the server's directory and
// API address, and waits until it is active.
func startVault(ctx context.Context, bin, storage string, clients int, args func(dir, addr string) ([]string, error)) (*vaultServer, error) {
	addr, err := freeLoopbackAddr()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "evenergy-bench-")
	if err != nil {
		return nil, err
	}
	serverArgs, err := args(dir, addr)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "vault.log"))
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	defer logFile.Close()
	v := &vaultServer{storage: storage, dir: dir, exited: make(chan struct{})}
	v.cmd = exec.Command(bin, append([]string{"server"}, serverArgs...)...)
	v.cmd.Stdout, v.cmd.Stderr = logFile, logFile
	// Its own process group, so that stop can end the plugins it started too; and if this program
	// dies, the server gets SIGTERM and stops them itself.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := v.cmd.Start(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	go func() {
		_ = v.cmd.Wait()
		close(v.exited)
	}()

	cfg := api.DefaultConfig()
	cfg.Address = "http://" + addr
	cfg.MaxRetries = 0 // a failed read fails the run; a retry would hide inside a timed read
	// Revoking thousands of leases one after another on Raft takes minutes, in one request.
	cfg.Timeout = 30 * time.Minute
	// One idle connection per client, so that bursts do not pay for new connections.
	cfg.HttpClient.Transport.(*http.Transport).MaxIdleConnsPerHost = clients
	if v.client, err = api.NewClient(cfg); err != nil {
		v.stop()
		return nil, err
	}
	v.client.SetToken("root")
	wait := v.waitActive
	if storage == "raft" {
		wait = v.waitAnswering // not initialized yet
	}
	if err := wait(ctx, 60*time.Second); err != nil {
		err = fmt.Errorf("%w\nVault's log ends:\n%s", err, v.logTail(40))
		v.stop()
		return nil, err
	}
	return v, nil
}

// waitActive waits until the server is initialized, unsealed and active.
func (v *vaultServer) waitActive(ctx context.Context, within time.Duration) error {
	return v.waitHealth(ctx, within, func(h *api.HealthResponse) bool { return h.Initialized && !h.Sealed && !h.Standby })
}

// waitAnswering waits until the server answers, in whatever state.
func (v *vaultServer) waitAnswering(ctx context.Context, within time.Duration) error {
	return v.waitHealth(ctx, within, func(*api.HealthResponse) bool { return true })
}

func (v *vaultServer) waitHealth(ctx context.Context, within time.Duration, ready func(*api.HealthResponse) bool) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		health, err := v.client.Sys().HealthWithContext(ctx)
		if err == nil && ready(health) {
			v.version = health.Version
			return nil
		}
		select {
		case <-v.exited:
			return errors.New("the Vault server exited")
		case <-ctx.Done():
			return fmt.Errorf("the Vault server was not ready within %s: %v", within, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop shuts the server down, gracefully if it can, so that it stops its plugin processes, and
// then kills whatever is left of its process group.
func (v *vaultServer) stop() {
	_ = v.cmd.Process.Signal(os.Interrupt)
	select {
	case <-v.exited:
	case <-time.After(30 * time.Second):
	}
	_ = syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
	<-v.exited
	_ = os.RemoveAll(v.dir)
}

// logTail is the end of the server's log, for failures.
func (v *vaultServer) logTail(lines int) string {
	log, err := os.ReadFile(filepath.Join(v.dir, "vault.log"))
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(log), "\n"), "\n")
	return strings.Join(all[max(0, len(all)-lines):], "\n")
}

// procMemory is what /proc/<pid>/status says of a process's memory, in bytes.
type procMemory struct {
	pid  int
	rss  int64 // VmRSS: resident now
	peak int64 // VmHWM: the most it was resident
}

// pluginMemory is the memory of the plugin process this server runs from exe.
func (v *vaultServer) pluginMemory(exe string) (procMemory, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return procMemory{}, err
	}
	var found []procMemory
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
		m := procMemory{}
		m.pid, _ = strconv.Atoi(p.Name())
		for name, into := range map[string]*int64{"VmRSS": &m.rss, "VmHWM": &m.peak} {
			kB, err := strconv.ParseInt(strings.TrimSuffix(fields[name], " kB"), 10, 64)
			if err != nil {
				return procMemory{}, fmt.Errorf("%s of process %s: %v", name, p.Name(), err)
			}
			*into = kB * 1024
		}
		found = append(found, m)
	}
	if len(found) != 1 {
		return procMemory{}, fmt.Errorf("found %d processes of %s started by Vault, want 1", len(found), exe)
	}
	return found[0], nil
}

// fileSystem names the file system dir is on: Raft's figures mean little on tmpfs, where fsync is free.
func fileSystem(dir string) string {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	names := map[int64]string{0xEF53: "ext4", 0x01021994: "tmpfs", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x794c7630: "overlayfs"}
	if name, ok := names[int64(st.Type)]; ok {
		return name
	}
	return fmt.Sprintf("0x%x", st.Type)
}

// cpuSeconds is the CPU time, user and system, process pid has used since it started.
func cpuSeconds(pid int) (float64, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// After the command in parentheses: the state (field 3) onwards; utime and stime are fields 14 and 15.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	var ticks int64
	for _, field := range fields[11:13] {
		n, err := strconv.ParseInt(field, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %v", pid, err)
		}
		ticks += n
	}
	const ticksPerSecond = 100 // USER_HZ on Linux
	return float64(ticks) / ticksPerSecond, nil
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
