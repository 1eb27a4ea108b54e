package evenergy

import (
	"context"
	"fmt"
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
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
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
		_ = devVault.cmd.Process.Kill()
		_ = devVault.cmd.Wait()
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

func startDevVault() error {
	bin := os.Getenv("VAULT_BIN")
	if bin == "" {
		return fmt.Errorf("VAULT_BIN is not set: run `make test`, which builds the Vault server into bin/vault")
	}
	dir, err := os.MkdirTemp("", "evenergy-acc-")
	if err != nil {
		return err
	}
	pluginDir := filepath.Join(dir, "plugins")
	build := exec.Command("go", "build", "-o", filepath.Join(pluginDir, pluginName), "./cmd/"+pluginName)
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("building the plugin: %v\n%s", err, out)
	}
	addr, err := freeLoopbackAddr()
	if err != nil {
		return err
	}
	devVault.log = filepath.Join(dir, "vault.log")
	logFile, err := os.Create(devVault.log)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, "server", "-dev", "-dev-root-token-id=root", "-dev-no-store-token",
		"-dev-listen-address="+addr, "-dev-plugin-dir="+pluginDir, "-log-level=debug")
	cmd.Stdout, cmd.Stderr = logFile, logFile
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
	mount   string
}

func newAccEnv(t *testing.T) *accEnv {
	t.Helper()
	e := &accEnv{vault: testVault(t), standin: standin.New()}
	e.standin.AddClient(standin.Client{ID: testClientID, Secret: testClientSecret, Scopes: testScopes})
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if e.outage.Load() {
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return
		}
		e.standin.ServeHTTP(w, r)
	}))
	t.Cleanup(server.Close)
	e.url = server.URL

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
	e.write(t, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": e.url})
	return e
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
	s, err := e.vault.Logical().List("sys/leases/lookup/" + e.path(p))
	if err != nil {
		t.Fatal(err)
	}
	var keys []any
	if s != nil {
		keys, _ = s.Data["keys"].([]any)
	}
	if len(keys) != want {
		t.Fatalf("Vault holds %d leases under %s, want %d", len(keys), p, want)
	}
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
	return b.(*backend), config.StorageView
}

// request runs one request against a unit backend.
func request(t testing.TB, b *backend, s logical.Storage, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	t.Helper()
	return b.HandleRequest(context.Background(), &logical.Request{Operation: op, Path: path, Storage: s, Data: data})
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
