package evenergy

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

const (
	testClientID     = "test-client"
	testClientSecret = "test+secret/=&?%" // characters HTTP Basic and form encoding must carry
	pluginName       = "vault-plugin-secrets-evenergy"
)

var testScopes = []string{"charging_session:read", "vehicle:read"}

// devVault is the one real `vault server -dev`, with this plugin, that the acceptance tests share.
var devVault struct {
	once   sync.Once
	client *api.Client
	log    string // path of the server's log
	cmd    *exec.Cmd
	err    error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if devVault.cmd != nil {
		stopServer(devVault.cmd)
	}
	// A data race in the plugin shows only in the logs of the Vault servers that ran it.
	if races := raceReports(); len(races) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: the race-built plugin reported data races:\n%s\n", strings.Join(races, "\n"))
		code = 1
	}
	if code == 0 && shared.dir != "" {
		_ = os.RemoveAll(shared.dir)
	} else if shared.dir != "" {
		fmt.Fprintf(os.Stderr, "Vault server logs kept in %s\n", shared.dir)
	}
	os.Exit(code)
}

// testVault returns a root client of the shared dev Vault, starting it on first use.
func testVault(t *testing.T) *api.Client {
	t.Helper()
	devVault.once.Do(func() { devVault.err = startDevVault() })
	if devVault.err != nil {
		t.Fatalf("dev Vault: %v", devVault.err)
	}
	c, err := devVault.client.Clone()
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken("root")
	return c
}

// server is what VAULT_BIN's `version` says it is, asked once.
var server struct {
	once    sync.Once
	version string
	err     error
}

// openBao reports whether VAULT_BIN is OpenBao's server, for the checks only Vault or only OpenBao
// can make.
func openBao(t testing.TB) bool {
	t.Helper()
	server.once.Do(func() {
		out, err := exec.Command(os.Getenv("VAULT_BIN"), "version").Output()
		server.version, server.err = string(out), err
	})
	if server.err != nil {
		t.Fatalf("%q version: %v", os.Getenv("VAULT_BIN"), server.err)
	}
	return strings.HasPrefix(server.version, "OpenBao ")
}

func startDevVault() error {
	bin := os.Getenv("VAULT_BIN")
	if bin == "" {
		return fmt.Errorf("VAULT_BIN is not set: run `make test`, which builds the Vault server into bin/vault")
	}
	pluginDir, _, err := racePlugin()
	if err != nil {
		return err
	}
	addr, err := freeLoopbackAddr()
	if err != nil {
		return err
	}
	logFile, err := serverLog("dev-vault")
	if err != nil {
		return err
	}
	defer logFile.Close()
	devVault.log = logFile.Name()
	// The raw storage endpoint lets a test write records as an earlier version of the plugin stored them.
	rawConfig := filepath.Join(shared.dir, "dev-vault.hcl")
	if err := os.WriteFile(rawConfig, []byte("raw_storage_endpoint = true\n"), 0o600); err != nil {
		return err
	}
	cmd := exec.Command(bin, "server", "-dev", "-dev-root-token-id=root", "-dev-no-store-token",
		"-dev-listen-address="+addr, "-dev-plugin-dir="+pluginDir, "-log-level=debug", "-config="+rawConfig)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = serverProcAttr()
	if err := cmd.Start(); err != nil {
		return err
	}
	devVault.cmd = cmd

	cfg := api.DefaultConfig()
	cfg.Address = "http://" + addr
	client, err := api.NewClient(cfg)
	if err != nil {
		return err
	}
	client.SetToken("root")
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		health, err := client.Sys().Health()
		if err == nil && health.Initialized && !health.Sealed {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("did not come up at %s within 60s (log: %s): %v", addr, devVault.log, err)
		}
	}
	devVault.client = client
	return nil
}

func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// accEnv is one test's own mount of the plugin in the dev Vault, configured against its own stand-in.
type accEnv struct {
	vault   *api.Client
	standin *standin.Server
	url     string      // the stand-in's base URL
	outage  atomic.Bool // while set, the stand-in answers 503 to everything
	server  *httptest.Server
	mount   string
}

// stopStandin stops the stand-in's server: connections to it are refused until startStandin.
func (e *accEnv) stopStandin() { e.server.Close() }

// startStandin serves the stand-in again at the address it had.
func (e *accEnv) startStandin(t *testing.T) {
	t.Helper()
	l, err := net.Listen("tcp", e.server.Listener.Addr().String())
	if err != nil {
		t.Fatalf("restarting the stand-in at its address: %v", err)
	}
	restarted := httptest.NewUnstartedServer(e.server.Config.Handler)
	restarted.Listener.Close()
	restarted.Listener = l
	restarted.Start()
	e.server = restarted
}

func newAccEnv(t *testing.T) *accEnv {
	t.Helper()
	e := &accEnv{vault: testVault(t), standin: standin.New()}
	e.standin.AddClient(standin.Client{ID: testClientID, Secret: testClientSecret, Scopes: testScopes})
	e.server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if e.outage.Load() {
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		}
		e.standin.ServeHTTP(w, r)
	}))
	t.Cleanup(func() { e.server.Close() })
	e.url = e.server.URL

	e.mount = "evenergy-" + strings.ToLower(regexp.MustCompile(`[^A-Za-z0-9]+`).ReplaceAllString(t.Name(), "-"))
	if err := e.vault.Sys().Mount(e.mount, &api.MountInput{Type: pluginName}); err != nil {
		t.Fatal(err)
	}
	// Cleanups run last-in first-out: the mount goes, revoking its leases, while the stand-in still serves.
	t.Cleanup(func() {
		if err := e.vault.Sys().Unmount(e.mount); err != nil {
			t.Errorf("unmount %s: %v", e.mount, err)
		}
	})
	e.write(t, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": e.url, "callback_url": e.callbackURL()})
	return e
}

// putStored writes v at key in this mount's storage, as a version of the plugin may have stored it.
func (e *accEnv) putStored(t *testing.T, key string, v any) {
	t.Helper()
	mounts, err := e.vault.Sys().ListMounts()
	if err != nil {
		t.Fatal(err)
	}
	value, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.vault.Logical().Write("sys/raw/logical/"+mounts[e.mount+"/"].UUID+"/"+key, map[string]any{"value": string(value)}); err != nil {
		t.Fatalf("writing the mount's storage: %v", err)
	}
}

func (e *accEnv) path(p string) string { return e.mount + "/" + p }

func (e *accEnv) write(t *testing.T, p string, data map[string]any) *api.Secret {
	t.Helper()
	s, err := e.vault.Logical().Write(e.path(p), data)
	if err != nil {
		t.Fatalf("write %s: %v", p, err)
	}
	return s
}

func (e *accEnv) read(t *testing.T, p string) *api.Secret {
	t.Helper()
	s, err := e.vault.Logical().Read(e.path(p))
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return s
}

// wantReadError reads a path of this mount that must fail with this HTTP status and message.
func (e *accEnv) wantReadError(t *testing.T, p string, status int, want string) {
	t.Helper()
	_, err := e.vault.Logical().Read(e.path(p))
	wantStatus(t, err, status, want)
}

// wantWriteError writes a path of this mount that must fail with this HTTP status and message.
func (e *accEnv) wantWriteError(t *testing.T, p string, data map[string]any, status int, want string) {
	t.Helper()
	_, err := e.vault.Logical().Write(e.path(p), data)
	wantStatus(t, err, status, want)
}

// wantLeases checks how many leases Vault holds under a path of this mount.
func (e *accEnv) wantLeases(t *testing.T, p string, want int) {
	t.Helper()
	if n := e.leaseCount(t, p); n != want {
		t.Fatalf("Vault holds %d leases under %s, want %d", n, p, want)
	}
}

// leaseCount is how many leases Vault holds under a path of this mount.
func (e *accEnv) leaseCount(t *testing.T, p string) int {
	t.Helper()
	s, err := e.vault.Logical().List("sys/leases/lookup/" + e.path(p))
	if err != nil {
		t.Fatal(err)
	}
	if s == nil {
		return 0
	}
	keys, _ := s.Data["keys"].([]any)
	return len(keys)
}

// wantStatus checks that err is a Vault API error with this HTTP status whose message says want.
func wantStatus(t *testing.T, err error, status int, want string) {
	t.Helper()
	respErr, ok := err.(*api.ResponseError)
	if !ok {
		t.Fatalf("want HTTP %d error saying %q, got %v", status, want, err)
	}
	if respErr.StatusCode != status || !strings.Contains(respErr.Error(), want) {
		t.Fatalf("want HTTP %d saying %q, got %d: %v", status, want, respErr.StatusCode, respErr)
	}
}

// eventually polls cond until it holds or the deadline passes; it waits on Vault's timers, it does not time them.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(within); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
	}
}

// newUnitBackend is the engine on logical.InmemStorage, for tests that need no Vault server.
func newUnitBackend(t testing.TB) (*backend, logical.Storage) {
	t.Helper()
	config := logical.TestBackendConfig()
	config.StorageView = &logical.InmemStorage{}
	b, err := Factory(context.Background(), config)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Cleanup(context.Background()) }) // the background refresh ends with the test
	return b.(*backend), config.StorageView
}

// request runs one request against a unit backend.
func request(t testing.TB, b *backend, s logical.Storage, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	t.Helper()
	return b.HandleRequest(context.Background(), &logical.Request{Operation: op, Path: path, Storage: s, Data: data})
}

// TestPerformanceStandbyForwardsLeasedReads: a node that reports itself a performance standby
// (Vault Enterprise's, or an OpenBao standby serving reads) cannot register a lease, so every read
// that returns one is forwarded (logical.ErrReadOnly) before any work, even for a token held fresh
// in its memory; reads that return no lease are answered there.
func TestPerformanceStandbyForwardsLeasedReads(t *testing.T) {
	active, standby, s, sv := twoNodes(t)
	connectUnitUser(t, active, s, sv, "driver")
	writeSharedRole(t, active, s, "fleet")
	readShared(t, active, s, "fleet")
	if _, err := request(t, active, s, logical.CreateOperation, rolePrefix+"brief", map[string]any{"ttl": "20s"}); err != nil {
		t.Fatal(err)
	}
	if err := standby.tokens.loadAll(t.Context(), s); err != nil {
		t.Fatal(err)
	}
	standby.System().(*logical.StaticSystemView).ReplicationStateVal = consts.ReplicationPerformanceStandby
	requests := sv.TokenRequests()

	for _, path := range []string{"token", "token/brief", "token/fleet", "users/driver/token"} {
		if resp, err := request(t, standby, s, logical.ReadOperation, path, nil); !errors.Is(err, logical.ErrReadOnly) {
			t.Errorf("%s on a performance standby: %v, lease %v; want it forwarded (logical.ErrReadOnly)", path, err, resp != nil && resp.Secret != nil)
		}
	}
	if n := sv.TokenRequests() - requests; n != 0 {
		t.Errorf("a performance standby sent %d token requests to ev.energy", n)
	}
	for _, path := range []string{"users/driver", "roles/fleet", "config"} {
		if resp, err := request(t, standby, s, logical.ReadOperation, path, nil); err != nil || resp == nil || resp.IsError() {
			t.Errorf("%s, which returns no lease, on a performance standby: %v %v; want it answered there", path, err, resp)
		}
	}
}

// get is an HTTP GET without redirects, as a browser's first hop.
func get(t *testing.T, rawURL string) *http.Response {
	t.Helper()
	resp, err := http.Get(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// shared is what every Vault server this test binary starts shares: one race-built plugin, and a
// directory of server logs that TestMain scans for race reports.
var shared struct {
	once      sync.Once
	dir       string
	pluginDir string
	pluginSum string // hex sha256 of the plugin binary, for the catalog
	err       error
	mu        sync.Mutex
	logs      []string
}

// racePlugin builds the plugin with the race detector, once, and returns its directory and sha256.
func racePlugin() (dir, sum string, err error) {
	shared.once.Do(func() { shared.err = buildRacePlugin() })
	return shared.pluginDir, shared.pluginSum, shared.err
}

func buildRacePlugin() error {
	dir, err := os.MkdirTemp("", "evenergy-acc-")
	if err != nil {
		return err
	}
	shared.dir, shared.pluginDir = dir, filepath.Join(dir, "plugins")
	bin := filepath.Join(shared.pluginDir, pluginName)
	build := exec.Command("go", "build", "-race", "-ldflags", "-X "+versionVar+"="+testVersion, "-o", bin, "./cmd/"+pluginName)
	build.Env = append(os.Environ(), "CGO_ENABLED=1") // the race detector needs cgo
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("building the plugin with -race: %v\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	shared.pluginSum = fmt.Sprintf("%x", sha256.Sum256(data))
	return nil
}

// serverLog creates the log file of a Vault server and has TestMain scan it for race reports.
func serverLog(name string) (*os.File, error) {
	if shared.dir == "" {
		return nil, fmt.Errorf("the plugin must be built before a server starts")
	}
	f, err := os.Create(filepath.Join(shared.dir, name+".log"))
	if err != nil {
		return nil, err
	}
	shared.mu.Lock()
	defer shared.mu.Unlock()
	shared.logs = append(shared.logs, f.Name())
	return f, nil
}

// serverProcAttr puts a Vault server in its own process group, so that killing the group ends its
// plugins too; if the test binary dies, the server gets SIGTERM and stops them itself.
func serverProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}

// stopServer stops a Vault server gracefully, so its plugins stop and what they wrote reaches the
// log, then kills whatever is left of its process group.
func stopServer(cmd *exec.Cmd) {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

// logPrefix is the time, level and logger name Vault puts before each line a plugin writes to stderr.
var logPrefix = regexp.MustCompile(`^\S+ +\[[A-Z]+\] +\S+?(: |$)`)

// raceReports returns the lines of every Go race report in the logs of the Vault servers started.
func raceReports() []string {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	var out []string
	for _, path := range shared.logs {
		data, err := os.ReadFile(path)
		if err != nil {
			out = append(out, fmt.Sprintf("cannot read %s to look for race reports: %v", path, err))
			continue
		}
		inReport := false
		for line := range strings.Lines(string(data)) {
			line = strings.TrimRight(line, "\n")
			if strings.Contains(line, "WARNING: DATA RACE") {
				inReport = true
				out = append(out, "in "+path+":")
			}
			if inReport {
				out = append(out, logPrefix.ReplaceAllString(line, ""))
				inReport = !strings.HasSuffix(line, "==================") // a report ends with a line of = signs
			}
		}
	}
	return out
}

// rawRead GETs a path of this mount as plain HTTP, for what the API client hides: headers, raw
// bodies, a 429 it would wait out.
func (e *accEnv) rawRead(t *testing.T, p string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, e.vault.Address()+"/v1/"+e.path(p), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Vault-Token", "root")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

// cli runs the Vault CLI (VAULT_BIN) against the dev Vault as root, without retries, and returns
// what it printed on stdout and stderr, as an operator sees it.
func (e *accEnv) cli(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	cmd := exec.Command(os.Getenv("VAULT_BIN"), args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+e.vault.Address(), "VAULT_TOKEN=root", "VAULT_MAX_RETRIES=0", "VAULT_FORMAT=table")
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}
