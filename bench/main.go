// Command bench compares reads of this engine's paths with Vault's kv-v1, a no-op leased plugin
// (the floor every external plugin pays) and a token POST straight to the ev.energy stand-in, on
// one dev Vault, in interleaved rounds; then it measures the plugin's memory holding many users.
// `make bench` builds the plugins it needs and runs it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

const (
	pluginName   = "vault-plugin-secrets-evenergy"
	noopName     = "bench-noop"
	engineMount  = "evenergy"
	usersMount   = "evenergy-users" // the second mount, holding the users of the memory figure
	role         = "bench"
	benchUser    = "bench-user"
	engineClient = "bench-vault"  // the stand-in client the engine is configured with
	directClient = "bench-direct" // the stand-in client of the direct POSTs, so its tokens stay apart
	clientSecret = "bench-secret"
	targetMiB    = 40
)

// report is the JSON file.
type report struct {
	Started        time.Time `json:"started"`
	VaultVersion   string    `json:"vault_version"`
	CPUs           int       `json:"cpus"`
	Rounds         int       `json:"rounds"`
	ReadsAlone     int       `json:"reads_alone_per_path"`
	ReadsBurst     int       `json:"reads_concurrent_per_path"`
	Clients        int       `json:"concurrent_clients"`
	Rows           []row     `json:"rows"`
	Users          int       `json:"users_imported"`
	PluginRSSMiB   float64   `json:"plugin_rss_mib"`
	PluginRSSStart float64   `json:"plugin_rss_mib_before_import"`
	TargetMiB      int       `json:"plugin_rss_target_mib"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() (err error) {
	vaultBin := flag.String("vault", "bin/vault", "the Vault server binary")
	pluginDir := flag.String("plugins", "bin/bench-plugins", "directory holding the "+pluginName+" and "+noopName+" binaries")
	out := flag.String("out", "bin/bench.json", "where to write the results as JSON")
	reads := flag.Int("reads", 2000, "reads per path over all rounds, half by one client and half by the concurrent clients")
	rounds := flag.Int("rounds", 5, "rounds, each reading every path in turn")
	clients := flag.Int("clients", 16, "concurrent clients of the throughput bursts")
	users := flag.Int("users", 10000, "user grants to import into a second mount before measuring the plugin's memory")
	flag.Parse()
	perRound := *reads / *rounds
	if perRound < 2 {
		return errors.New("-reads must be at least twice -rounds")
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	started := time.Now().UTC()

	ev := standin.New()
	for _, id := range []string{engineClient, directClient} {
		ev.AddClient(standin.Client{ID: id, Secret: clientSecret, Scopes: []string{"charging_session:read", "vehicle:read"}})
	}
	server := httptest.NewServer(ev)
	defer server.Close()

	plugins, err := filepath.Abs(*pluginDir)
	if err != nil {
		return err
	}
	v, err := startVault(ctx, *vaultBin, plugins, *clients)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "Vault's log ends:\n%s\n", v.logTail(40))
		}
		v.stop()
	}()

	targets, err := setUp(ctx, v.client, ev, server.URL, *clients)
	if err != nil {
		return err
	}
	p := plan{
		rounds: *rounds, alone: perRound / 2, burst: perRound - perRound/2, clients: *clients,
		between: func(ctx context.Context) error { return revokeLeases(ctx, v.client) },
	}
	results, err := measure(ctx, targets, p)
	if err != nil {
		return err
	}
	if err := checkStandin(ev); err != nil {
		return err
	}

	exe, err := filepath.EvalSymlinks(filepath.Join(plugins, pluginName))
	if err != nil {
		return err
	}
	before, err := v.pluginRSS(exe)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "importing %d user grants into %s/\n", *users, usersMount)
	if err := importUsers(ctx, v.client, ev, *users); err != nil {
		return err
	}
	after, err := v.pluginRSS(exe)
	if err != nil {
		return err
	}

	r := report{
		Started: started, VaultVersion: v.version, CPUs: runtime.NumCPU(),
		Rounds: p.rounds, ReadsAlone: p.rounds * p.alone, ReadsBurst: p.rounds * p.burst, Clients: p.clients,
		Rows:  summarize(targets, results),
		Users: *users, PluginRSSMiB: mib(after), PluginRSSStart: mib(before), TargetMiB: targetMiB,
	}
	printReport(os.Stdout, r)
	return writeJSON(*out, r)
}

// setUp mounts and configures what the rows read, and returns the rows in table order.
func setUp(ctx context.Context, c *api.Client, ev *standin.Server, standinURL string, clients int) ([]target, error) {
	mounts := map[string]*api.MountInput{
		"kv":        {Type: "kv", Options: map[string]string{"version": "1"}},
		"noop":      {Type: noopName},
		engineMount: {Type: pluginName},
		usersMount:  {Type: pluginName},
	}
	for path, m := range mounts {
		if err := c.Sys().MountWithContext(ctx, path, m); err != nil {
			return nil, fmt.Errorf("mount %s: %w", path, err)
		}
	}
	writes := []struct {
		path string
		data map[string]any
	}{
		{"kv/bench", map[string]any{"value": "x"}},
		{engineMount + "/config", engineConfig(standinURL)},
		{engineMount + "/roles/" + role, map[string]any{"ttl": "60s"}},
		{usersMount + "/config", engineConfig(standinURL)},
	}
	for _, w := range writes {
		if _, err := c.Logical().WriteWithContext(ctx, w.path, w.data); err != nil {
			return nil, fmt.Errorf("write %s: %w", w.path, err)
		}
	}
	if err := importUser(ctx, c, ev, engineMount, benchUser); err != nil {
		return nil, err
	}

	post := clientcredentials.Config{
		ClientID: directClient, ClientSecret: clientSecret, TokenURL: standinURL + "/o/token",
		AuthStyle: oauth2.AuthStyleInHeader, // as the engine sends client-credentials requests
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = clients // as for Vault: no new connections in the bursts
	postClient := &http.Client{Transport: transport}
	read := func(name, path string, k kind) target {
		return target{name, path, k, vaultRead(c, path, k != builtin)}
	}
	return []target{
		read("kv-v1", "kv/bench", builtin),
		read("leased floor: no-op plugin", "noop/creds", floor),
		read("user token, fresh", engineMount+"/users/"+benchUser+"/token", engine),
		read("client credentials", engineMount+"/token", minting),
		read("role token, ttl=60s", engineMount+"/token/"+role, minting),
		{"direct token POST to the stand-in", "POST /o/token", direct, func(ctx context.Context) error {
			_, err := post.Token(context.WithValue(ctx, oauth2.HTTPClient, postClient))
			return err
		}},
	}, nil
}

func engineConfig(standinURL string) map[string]any {
	return map[string]any{"client_id": engineClient, "client_secret": clientSecret, "base_url": standinURL}
}

// vaultRead reads path, checking that it answers with data, under a lease when leased.
func vaultRead(c *api.Client, path string, leased bool) func(context.Context) error {
	return func(ctx context.Context) error {
		s, err := c.Logical().ReadWithContext(ctx, path)
		switch {
		case err != nil:
			return err
		case s == nil || len(s.Data) == 0:
			return fmt.Errorf("read %s: no data", path)
		case leased != (s.LeaseID != ""):
			return fmt.Errorf("read %s: leased is %t, want %t", path, s.LeaseID != "", leased)
		}
		return nil
	}
}

// revokeLeases ends the leases of the rounds so far, so that they do not pile up in Vault.
func revokeLeases(ctx context.Context, c *api.Client) error {
	for _, prefix := range []string{"noop/", engineMount + "/"} {
		if _, err := c.Logical().WriteWithContext(ctx, "sys/leases/revoke-prefix/"+prefix, map[string]any{"sync": true}); err != nil {
			return fmt.Errorf("revoke leases of %s: %w", prefix, err)
		}
	}
	return nil
}

// checkStandin checks, at the stand-in, that every token minted through Vault was revoked when its
// lease was, and that the user row never refreshed: its token was fresh throughout.
func checkStandin(ev *standin.Server) error {
	var live, refreshes int
	for _, t := range ev.Tokens() {
		if t.ClientID == engineClient && t.Grant == "client_credentials" && !t.Revoked {
			live++
		}
		if t.User == benchUser && t.Grant == "refresh_token" && t.Kind == "access" {
			refreshes++
		}
	}
	if live > 0 {
		return fmt.Errorf("%d client-credentials tokens minted through Vault are still live after their leases were revoked", live)
	}
	if refreshes != 1 { // the import's
		return fmt.Errorf("%s's token was refreshed %d times, want once (when imported)", benchUser, refreshes)
	}
	return nil
}

// importUsers imports n user grants into the second mount from a few concurrent writers.
func importUsers(ctx context.Context, c *api.Client, ev *standin.Server, n int) error {
	return concurrently(n, 4, func(i int) error {
		return importUser(ctx, c, ev, usersMount, fmt.Sprintf("driver-%05d", i))
	})
}

// importUser has the stand-in grant user's consent to the engine's client and imports the refresh
// token into the engine at mount.
func importUser(ctx context.Context, c *api.Client, ev *standin.Server, mount, user string) error {
	refreshToken, err := ev.IssueUserGrant(engineClient, user, "")
	if err != nil {
		return err
	}
	path := mount + "/users/" + user
	if _, err := c.Logical().WriteWithContext(ctx, path, map[string]any{"refresh_token": refreshToken}); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func printReport(w io.Writer, r report) {
	fmt.Fprintf(w, "Vault %s, %d CPUs, %d interleaved rounds; per path %d reads by 1 client and %d by %d concurrent clients.\n\n",
		r.VaultVersion, r.CPUs, r.Rounds, r.ReadsAlone, r.ReadsBurst, r.Clients)
	fmt.Fprintf(w, "| read | p50, 1 client | p99, 1 client | req/s, %d clients | p50 / floor | req/s / floor | p50 as floor + POST + X |\n", r.Clients)
	fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---|")
	for _, row := range r.Rows {
		fmt.Fprintf(w, "| %s `%s` | %.2f ms | %.2f ms | %.0f | %s | %s | %s |\n", row.Name, row.Path, row.P50Ms, row.P99Ms, row.ReqPerSec,
			optional("%.2f", row.P50VsFloor), optional("%.2f", row.ReqPerSecFloor), optional("floor + POST + %.2f ms", row.ExtraMs))
	}
	fmt.Fprintf(w, "\nPlugin resident memory (VmRSS) with %d user grants imported: %.1f MiB (target under %d MiB; %.1f MiB before the imports).\n",
		r.Users, r.PluginRSSMiB, r.TargetMiB, r.PluginRSSStart)
}

// optional formats f, or nothing for a row it does not apply to.
func optional(format string, f *float64) string {
	if f == nil {
		return ""
	}
	return fmt.Sprintf(format, *f)
}

func writeJSON(path string, r report) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

func mib(bytes int64) float64 { return float64(bytes) / (1 << 20) }
