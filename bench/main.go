// Command bench compares requests to this engine's paths with a kv-v1 write, a no-op leased plugin
// (the floor every external plugin pays) and a token POST straight to the ev.energy stand-in, in
// interleaved rounds, on a dev Vault (in-memory storage) and then on a single-node Raft Vault.
// With -scale it measures one mount holding 100,000 users on Raft instead (see scale.go).
// `make bench` and `make bench-scale` build the plugins it needs and run it; it writes its results
// to a JSON file and into its section of docs/benchmarks.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"

	"github.com/hashicorp/vault/api"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

const (
	pluginName   = "vault-plugin-secrets-evenergy"
	noopName     = "bench-noop"
	engineMount  = "evenergy"
	role         = "bench"
	sharedRole   = "bench-shared" // a shared role: one token for every reader, served from memory
	benchUser    = "bench-user"
	engineClient = "bench-vault"  // the stand-in client the engine is configured with
	directClient = "bench-direct" // the stand-in client of the direct POSTs, so its tokens stay apart
	clientSecret = "bench-secret"
)

// standinScopes are the scopes of the stand-ins' clients.
var standinScopes = []string{"charging_session:read", "vehicle:read"}

// report is the JSON file of the table.
type report struct {
	Machine    machine `json:"machine"`
	Rounds     int     `json:"rounds"`
	ReadsAlone int     `json:"requests_alone_per_path"`
	ReadsBurst int     `json:"requests_concurrent_per_path"`
	Clients    int     `json:"concurrent_clients"`
	Tables     []table `json:"tables"`
}

// table is the rows measured on one Vault.
type table struct {
	Storage      string `json:"storage"`
	FileSystem   string `json:"file_system,omitempty"` // where Raft keeps its data
	VaultVersion string `json:"vault_version"`
	Rows         []row  `json:"rows"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	vaultBin := flag.String("vault", "bin/vault", "the Vault server binary")
	standinBin := flag.String("standin", "bin/evenergy-standin", "the stand-in's binary, which serves the direct POSTs from a process of its own")
	pluginDir := flag.String("plugins", "bin/bench-plugins", "directory holding the "+pluginName+" and "+noopName+" binaries")
	out := flag.String("out", "", "where to write the results as JSON (default bin/bench.json, or bin/bench-scale.json with -scale)")
	doc := flag.String("doc", "docs/benchmarks.md", "the Markdown file whose generated section gets the results")
	reads := flag.Int("reads", 4200, "requests per path and Vault over all rounds, half by one client and half by the concurrent clients")
	rounds := flag.Int("rounds", 7, "rounds, each timing every path in turn; ratios are medians over them")
	clients := flag.Int("clients", 16, "concurrent clients")
	scale := flag.Bool("scale", false, "measure one mount holding -users users on Raft instead of the table")
	users := flag.Int("users", 100_000, "with -scale: user grants to import")
	leases := flag.Int("leases", 10_000, "with -scale: leases to revoke by prefix")
	goBench := flag.String("gobench", "^BenchmarkScale", "with -scale: the Go benchmarks of the engine to run first and report (empty: none)")
	flag.Parse()
	perRound := *reads / *rounds
	if perRound < 2 {
		return errors.New("-reads must be at least twice -rounds")
	}
	if *out == "" {
		*out = map[bool]string{false: "bin/bench.json", true: "bin/bench-scale.json"}[*scale]
	}

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	m, err := describeMachine()
	if err != nil {
		return err
	}
	plugins, err := filepath.Abs(*pluginDir)
	if err != nil {
		return err
	}
	if *scale {
		return runScale(ctx, scalePlan{
			machine: m, vaultBin: *vaultBin, plugins: plugins, out: *out, doc: *doc,
			users: *users, leases: *leases, clients: *clients, rounds: *rounds, goBench: *goBench,
		})
	}

	p := plan{rounds: *rounds, alone: perRound / 2, burst: perRound - perRound/2, clients: *clients}
	r := report{Machine: m, Rounds: p.rounds, ReadsAlone: p.rounds * p.alone, ReadsBurst: p.rounds * p.burst, Clients: p.clients}
	for _, storage := range []string{"inmem", "raft"} {
		t, err := measureOn(ctx, storage, *vaultBin, plugins, *standinBin, p)
		if err != nil {
			return fmt.Errorf("on %s storage: %w", storage, err)
		}
		r.Tables = append(r.Tables, t)
	}
	text := tableMarkdown(r)
	fmt.Print(text)
	if err := writeJSON(*out, r); err != nil {
		return err
	}
	return writeSection(*doc, "make bench", text)
}

// measureOn starts a Vault on storage, with a stand-in of its own and one in a process for the
// direct POSTs, and measures the table's rows on it.
func measureOn(ctx context.Context, storage, vaultBin, plugins, standinBin string, p plan) (t table, err error) {
	fmt.Fprintf(os.Stderr, "measuring on a Vault with %s storage\n", storage)
	ev, server := startStandin()
	defer server.Close()
	directStandin, err := startStandinProcess(ctx, standinBin)
	if err != nil {
		return t, err
	}
	defer directStandin.stop()

	var v *vaultServer
	if storage == "raft" {
		v, err = startRaftVault(ctx, vaultBin, plugins, p.clients, pluginName, noopName)
	} else {
		v, err = startDevVault(ctx, vaultBin, plugins, p.clients)
	}
	if err != nil {
		return t, err
	}
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "Vault's log ends:\n%s\n", v.logTail(40))
		}
		v.stop()
	}()

	targets, err := setUp(ctx, v.client, ev, server.URL, directStandin.url, p.clients)
	if err != nil {
		return t, err
	}
	p.between = func(ctx context.Context) error { return revokeLeases(ctx, v.client, "noop/", engineMount+"/") }
	results, err := measure(ctx, targets, p)
	if err != nil {
		return t, err
	}
	// A shared role's token outlives its leases by design: an operator's rotate ends it.
	if _, err := v.client.Logical().WriteWithContext(ctx, engineMount+"/rotate-role/"+sharedRole, nil); err != nil {
		return t, err
	}
	if err := checkStandin(ev); err != nil {
		return t, err
	}
	t = table{Storage: storage, VaultVersion: v.version, Rows: summarize(targets, results)}
	if storage == "raft" {
		t.FileSystem = fileSystem(v.dir)
	}
	return t, nil
}

// setUp mounts and configures what the rows request, and returns the rows in table order. The
// engine's requests go to the stand-in at standinURL, the direct POSTs to the one at directURL.
func setUp(ctx context.Context, c *api.Client, ev *standin.Server, standinURL, directURL string, clients int) ([]target, error) {
	if err := mountAll(ctx, c); err != nil {
		return nil, err
	}
	writes := []struct {
		path string
		data map[string]any
	}{
		{engineMount + "/config", engineConfig(standinURL)},
		{engineMount + "/roles/" + role, map[string]any{"ttl": "60s"}},
		{engineMount + "/roles/" + sharedRole, map[string]any{"shared": true}},
		{"noop/mint-target", map[string]any{"token_url": standinURL + "/o/token", "client_id": directClient, "client_secret": clientSecret}},
	}
	for _, w := range writes {
		if _, err := c.Logical().WriteWithContext(ctx, w.path, w.data); err != nil {
			return nil, fmt.Errorf("write %s: %w", w.path, err)
		}
	}
	if err := importUser(ctx, c, ev, benchUser); err != nil {
		return nil, err
	}

	mint := directToken(directURL, pooledClient(clients))
	read := func(name, path string, k kind) target {
		return target{name: name, path: path, kind: k, read: vaultRead(c, path, k != builtin)}
	}
	// Each direct POST comes after a floor read, as the engine's POST comes after Vault's work on the
	// request before: on Raft that work ends waiting for an fsync, and a POST from a machine that sat
	// idle for milliseconds takes about three times as long as one sent back to back.
	floorRead := vaultRead(c, "noop/creds", true)
	return []target{
		{name: "kv-v1 write (one storage write)", path: "kv/bench/<n>", kind: builtin, read: kvWrite(c, "kv/bench")},
		read("leased floor: no-op plugin", "noop/creds", floor),
		read("no-op plugin, answering as the user token", "noop/token", shaped),
		read("user token, cached", engineMount+"/users/"+benchUser+"/token", engine),
		read("shared role token", engineMount+"/token/"+sharedRole, engine),
		read("no-op plugin, minting as the token path", "noop/mint", minting),
		read("client credentials", engineMount+"/token", minting),
		read("role token, ttl=60s", engineMount+"/token/"+role, minting),
		{name: "direct token POST to a stand-in process", path: "POST /o/token", kind: direct, read: func(ctx context.Context) error {
			_, err := mint(ctx)
			return err
		}, before: floorRead},
	}, nil
}

// startStandin serves a stand-in on loopback with the engine's client and the direct POSTs' client.
func startStandin() (*standin.Server, *httptest.Server) {
	ev := standin.New()
	for _, id := range []string{engineClient, directClient} {
		ev.AddClient(standin.Client{ID: id, Secret: clientSecret, Scopes: standinScopes})
	}
	return ev, httptest.NewServer(ev)
}

// mountAll mounts kv-v1, the no-op plugin and the engine.
func mountAll(ctx context.Context, c *api.Client) error {
	mounts := map[string]*api.MountInput{
		"kv":        {Type: "kv", Options: map[string]string{"version": "1"}},
		"noop":      {Type: noopName},
		engineMount: {Type: pluginName},
	}
	for path, m := range mounts {
		if err := c.Sys().MountWithContext(ctx, path, m); err != nil {
			return fmt.Errorf("mount %s: %w", path, err)
		}
	}
	return nil
}

func engineConfig(standinURL string) map[string]any {
	return map[string]any{"client_id": engineClient, "client_secret": clientSecret, "base_url": standinURL}
}

// directToken mints a client-credentials token at the stand-in without Vault, as the engine asks
// for one, over client.
func directToken(standinURL string, client *http.Client) func(context.Context) (*oauth2.Token, error) {
	post := clientcredentials.Config{
		ClientID: directClient, ClientSecret: clientSecret, TokenURL: standinURL + "/o/token",
		AuthStyle: oauth2.AuthStyleInHeader, // as the engine sends client-credentials requests
	}
	return func(ctx context.Context) (*oauth2.Token, error) {
		return post.Token(context.WithValue(ctx, oauth2.HTTPClient, client))
	}
}

// pooledClient is an HTTP client keeping an idle connection per client, as Vault's does: no new
// connections in the bursts.
func pooledClient(clients int) *http.Client {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = clients
	return &http.Client{Transport: transport}
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

// kvWrite writes a small value under a kv-v1 prefix: one storage write. Each write has a key of its
// own, as each lease has: Vault serializes concurrent writes of one key.
func kvWrite(c *api.Client, prefix string) func(context.Context) error {
	var written atomic.Int64
	return func(ctx context.Context) error {
		path := fmt.Sprintf("%s/%d", prefix, written.Add(1))
		_, err := c.Logical().WriteWithContext(ctx, path, map[string]any{"value": "x"})
		return err
	}
}

// revokeLeases ends the leases under the prefixes at once, so that they do not pile up in Vault.
func revokeLeases(ctx context.Context, c *api.Client, prefixes ...string) error {
	for _, prefix := range prefixes {
		if _, err := c.Logical().WriteWithContext(ctx, "sys/leases/revoke-prefix/"+prefix, map[string]any{"sync": true}); err != nil {
			return fmt.Errorf("revoke leases of %s: %w", prefix, err)
		}
	}
	return nil
}

// checkStandin checks, at the stand-in, that every token minted through Vault was revoked when its
// lease was, and that the user row never refreshed: its token was fresh throughout.
func checkStandin(ev *standin.Server) error {
	if err := checkRevoked(ev); err != nil {
		return err
	}
	refreshes := 0
	for _, t := range ev.Tokens() {
		if t.User == benchUser && t.Grant == "refresh_token" && t.Kind == "access" {
			refreshes++
		}
	}
	if refreshes != 1 { // the import's
		return fmt.Errorf("%s's token was refreshed %d times, want once (when imported)", benchUser, refreshes)
	}
	return nil
}

// checkRevoked checks that no client-credentials token minted through Vault is live at the stand-in.
func checkRevoked(ev *standin.Server) error {
	live := 0
	for _, t := range ev.Tokens() {
		if t.ClientID == engineClient && t.Grant == "client_credentials" && !t.Revoked {
			live++
		}
	}
	if live > 0 {
		return fmt.Errorf("%d client-credentials tokens minted through Vault are still live after their leases were revoked", live)
	}
	return nil
}

// importUser has the stand-in grant user's consent to the engine's client and imports the refresh
// token into the engine.
func importUser(ctx context.Context, c *api.Client, ev *standin.Server, user string) error {
	refreshToken, err := ev.IssueUserGrant(engineClient, user, "")
	if err != nil {
		return err
	}
	path := engineMount + "/users/" + user
	if _, err := c.Logical().WriteWithContext(ctx, path, map[string]any{"refresh_token": refreshToken}); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
