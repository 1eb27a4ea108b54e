package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// targetMiB is the most the plugin process may hold resident with the users imported.
const targetMiB = 100

// scalePlan is what -scale measures and where it writes the results.
type scalePlan struct {
	machine                     machine
	vaultBin, plugins, out, doc string
	users, leases, clients      int
	rounds                      int    // the imports and revocations come in rounds, each beside its floor
	goBench                     string // the engine's Go benchmarks to run first
}

// scaleReport is the JSON file of -scale.
type scaleReport struct {
	Machine      machine        `json:"machine"`
	GoBenchmarks []goBenchmark  `json:"go_benchmarks"`
	VaultVersion string         `json:"vault_version"`
	FileSystem   string         `json:"file_system"`
	Clients      int            `json:"concurrent_clients"`
	Import       importFigures  `json:"import"`
	Memory       memoryFigures  `json:"memory"`
	Starts       []startFigures `json:"starts"`
	Revocation   revocation     `json:"revocation"`
}

type importFigures struct {
	Users   int     `json:"users"`
	Seconds float64 `json:"seconds"`
	PerSec  float64 `json:"grants_per_sec"`
	// The floor: kv-v1 writes (one storage write each) from as many clients, before each round of imports.
	KVWritesPerSec float64 `json:"kv_v1_writes_per_sec"`
	VsKVWrites     float64 `json:"grants_per_sec_vs_kv_v1_writes"` // the median of the rounds' ratios
}

type memoryFigures struct {
	TargetMiB   int    `json:"target_mib"`
	Noop        memory `json:"noop_plugin"` // the floor: a plugin holding nothing
	AfterImport memory `json:"engine_after_import"`
	AfterStart  memory `json:"engine_after_start"` // a new process that loaded every grant
}

type memory struct {
	RSSMiB  float64 `json:"rss_mib"`
	PeakMiB float64 `json:"peak_rss_mib"`
}

// startFigures time, from an unseal (a restart or a failover starts every plugin so), the first
// served reads and the engine holding every grant.
type startFigures struct {
	Grants     int     `json:"grants"`
	NoopReadS  float64 `json:"first_noop_read_s"` // the floor: Vault's own start
	UserReadS  float64 `json:"first_user_read_s"`
	AllLoadedS float64 `json:"all_loaded_s"`
	// HeldAtFirstRead is how many grants the engine held right after the first user-token read:
	// fewer than Grants when reads are served before the load ends.
	HeldAtFirstRead int `json:"grants_held_at_first_read"`
	// The CPU time the new engine process and the Vault server used until every grant was loaded.
	EngineCPUS float64 `json:"engine_cpu_s"`
	VaultCPUS  float64 `json:"vault_cpu_s"`
}

type revocation struct {
	Leases        int     `json:"leases"`
	EnginePerSec  float64 `json:"engine_leases_per_sec"`
	NoopPerSec    float64 `json:"noop_leases_per_sec"`     // the floor: Vault's own work per lease
	StandinPerSec float64 `json:"standin_revokes_per_sec"` // one request after another, as a sync revoke-prefix goes
	// The medians of the rounds' ratios of the engine's rate to the no-op plugin's and to the stand-in's.
	VsNoop    float64 `json:"engine_vs_noop"`
	VsStandin float64 `json:"engine_vs_standin"`
}

func runScale(ctx context.Context, p scalePlan) (err error) {
	r := scaleReport{Machine: p.machine, Clients: p.clients}
	if p.goBench != "" {
		if r.GoBenchmarks, err = runGoBenchmarks(ctx, p.goBench); err != nil {
			return err
		}
	}

	ev, server := startStandin()
	defer server.Close()
	v, err := startRaftVault(ctx, p.vaultBin, p.plugins, p.clients, pluginName, noopName)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			fmt.Fprintf(os.Stderr, "Vault's log ends:\n%s\n", v.logTail(40))
		}
		v.stop()
	}()
	r.VaultVersion, r.FileSystem = v.version, fileSystem(v.dir)
	if err := mountAll(ctx, v.client); err != nil {
		return err
	}
	if _, err := v.client.Logical().WriteWithContext(ctx, engineMount+"/config", engineConfig(server.URL)); err != nil {
		return err
	}
	if err := importUser(ctx, v.client, ev, benchUser); err != nil { // the user whose token the starts read
		return err
	}

	// The executables as /proc names them.
	engineExe, err := filepath.EvalSymlinks(filepath.Join(p.plugins, pluginName))
	if err != nil {
		return err
	}
	noopExe, err := filepath.EvalSymlinks(filepath.Join(p.plugins, noopName))
	if err != nil {
		return err
	}
	start, err := timeStart(ctx, v, engineExe, 1)
	if err != nil {
		return err
	}
	r.Starts = append(r.Starts, start)
	if r.Import, err = importUsers(ctx, v.client, ev, p.users, p.clients, p.rounds); err != nil {
		return err
	}
	r.Memory.TargetMiB = targetMiB
	if r.Memory.AfterImport, err = residentMemory(v, engineExe); err != nil {
		return err
	}
	if start, err = timeStart(ctx, v, engineExe, p.users+1); err != nil {
		return err
	}
	r.Starts = append(r.Starts, start)
	if r.Memory.AfterStart, err = residentMemory(v, engineExe); err != nil {
		return err
	}
	if r.Memory.Noop, err = residentMemory(v, noopExe); err != nil {
		return err
	}
	if r.Revocation, err = timeRevocation(ctx, v.client, ev, server.URL, p.leases, p.clients, p.rounds); err != nil {
		return err
	}

	text := scaleMarkdown(r)
	fmt.Print(text)
	if err := writeJSON(p.out, r); err != nil {
		return err
	}
	return writeSection(p.doc, "make bench-scale", text)
}

// importUsers imports users grants from that many concurrent clients, as an application moving its
// users into Vault would, in rounds, each after kv-v1 writes (one storage write each) as the floor.
func importUsers(ctx context.Context, c *api.Client, ev *standin.Server, users, clients, rounds int) (importFigures, error) {
	f := importFigures{Users: users}
	writes := max(clients, users/rounds/10)
	var kvTime, importTime time.Duration
	ratios := make([]float64, rounds)
	write := kvWrite(c, "kv/bench")
	fmt.Fprintf(os.Stderr, "importing %d user grants in %d rounds\n", users, rounds)
	for n := range rounds {
		kv, err := timed(func() error {
			return concurrently(writes, clients, func(int) error { return write(ctx) })
		})
		if err != nil {
			return f, err
		}
		from, to := part(users, rounds, n)
		took, err := timed(func() error {
			return concurrently(to-from, clients, func(i int) error { return importUser(ctx, c, ev, fmt.Sprintf("driver-%06d", from+i-1)) })
		})
		if err != nil {
			return f, err
		}
		ratios[n] = (float64(to-from) / took.Seconds()) / (float64(writes) / kv.Seconds())
		kvTime, importTime = kvTime+kv, importTime+took
		fmt.Fprintf(os.Stderr, "  %d imported\n", to)
	}
	f.Seconds = importTime.Seconds()
	f.PerSec = float64(users) / f.Seconds
	f.KVWritesPerSec = float64(rounds*writes) / kvTime.Seconds()
	f.VsKVWrites = median(ratios)
	return f, nil
}

// part is where round n of rounds begins and ends in 0 to total.
func part(total, rounds, n int) (from, to int) { return n * total / rounds, (n + 1) * total / rounds }

// timed is how long do took.
func timed(do func() error) (time.Duration, error) {
	began := time.Now()
	err := do()
	return time.Since(began), err
}

func residentMemory(v *vaultServer, exe string) (memory, error) {
	m, err := v.pluginMemory(exe)
	return memory{RSSMiB: mib(m.rss), PeakMiB: mib(m.peak)}, err
}

func mib(bytes int64) float64 { return float64(bytes) / (1 << 20) }

// timeStart seals the server and unseals it, which starts every plugin as a restart or a failover
// does, and times from the unseal until a read of the no-op plugin and of a user's token first
// succeed and until the engine, run from engineExe, holds all its grants.
func timeStart(ctx context.Context, v *vaultServer, engineExe string, grants int) (startFigures, error) {
	fmt.Fprintf(os.Stderr, "sealing and unsealing with %d user grants stored\n", grants)
	if err := v.client.Sys().SealWithContext(ctx); err != nil {
		return startFigures{}, fmt.Errorf("seal: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	vaultCPU, err := cpuSeconds(v.cmd.Process.Pid)
	if err != nil {
		return startFigures{}, err
	}
	began := time.Now()
	if err := v.unseal(ctx); err != nil {
		return startFigures{}, err
	}
	f := startFigures{Grants: grants}
	noopRead := vaultRead(v.client, "noop/creds", true)
	userRead := vaultRead(v.client, engineMount+"/users/"+benchUser+"/token", true)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i, first := range []struct {
		seconds *float64
		done    func(context.Context) bool
	}{
		{&f.NoopReadS, func(ctx context.Context) bool { return noopRead(ctx) == nil }},
		{&f.UserReadS, func(ctx context.Context) bool {
			if userRead(ctx) != nil {
				return false
			}
			f.HeldAtFirstRead = grantsHeld(ctx, v.client)
			return true
		}},
		{&f.AllLoadedS, func(ctx context.Context) bool { return grantsHeld(ctx, v.client) == grants }},
	} {
		wg.Go(func() {
			for !first.done(ctx) {
				select {
				case <-ctx.Done():
					errs[i] = fmt.Errorf("waiting after an unseal: %w", ctx.Err())
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
			*first.seconds = time.Since(began).Seconds()
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return f, err
	}
	if f.VaultCPUS, err = cpuSeconds(v.cmd.Process.Pid); err != nil {
		return f, err
	}
	f.VaultCPUS -= vaultCPU
	engine, err := v.pluginMemory(engineExe)
	if err != nil {
		return f, err
	}
	f.EngineCPUS, err = cpuSeconds(engine.pid)
	return f, err
}

// grantsHeld is how many grants the engine holds in memory, from its metrics; -1 when unknown.
func grantsHeld(ctx context.Context, c *api.Client) int {
	resp, err := c.Logical().ReadRawWithDataWithContext(ctx, engineMount+"/metrics", map[string][]string{"format": {"prometheus"}})
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	held := 0
	for lines := bufio.NewScanner(resp.Body); lines.Scan(); {
		if line := lines.Text(); strings.HasPrefix(line, "evenergy_user_grants{") {
			n, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			if err != nil {
				return -1
			}
			held += int(n)
		}
	}
	return held
}

// timeRevocation revokes leases client-credentials leases of the engine, and as many of the no-op
// plugin, by prefix, and sends as many revocations straight to the stand-in one after another, in
// rounds, each revoking a part of each, in turn.
func timeRevocation(ctx context.Context, c *api.Client, ev *standin.Server, standinURL string, leases, clients, rounds int) (revocation, error) {
	f := revocation{Leases: leases}
	client := pooledClient(clients)
	mint := directToken(standinURL, client)
	var engine, noop, direct time.Duration
	vsNoop, vsStandin := make([]float64, rounds), make([]float64, rounds)
	fmt.Fprintf(os.Stderr, "revoking %d leases of each plugin in %d rounds\n", leases, rounds)
	for n := range rounds {
		from, to := part(leases, rounds, n)
		tokens := make([]string, to-from)
		for _, path := range []string{"noop/creds", engineMount + "/token"} {
			if err := concurrently(to-from, clients, func(int) error { return vaultRead(c, path, true)(ctx) }); err != nil {
				return f, err
			}
		}
		if err := concurrently(to-from, clients, func(i int) error {
			tok, err := mint(ctx)
			if err == nil {
				tokens[i-1] = tok.AccessToken
			}
			return err
		}); err != nil {
			return f, err
		}
		revoke := []struct {
			took *time.Duration
			do   func() error
		}{
			{new(time.Duration), func() error { return revokeLeases(ctx, c, "noop/") }},
			{new(time.Duration), func() error { return revokeLeases(ctx, c, engineMount+"/token/") }},
			{new(time.Duration), func() error {
				for _, token := range tokens {
					if err := revokeAtStandin(ctx, client, standinURL, token); err != nil {
						return err
					}
				}
				return nil
			}},
		}
		for k := range revoke {
			r := revoke[(n+k)%len(revoke)]
			var err error
			if *r.took, err = timed(r.do); err != nil {
				return f, err
			}
		}
		vsNoop[n] = float64(*revoke[0].took) / float64(*revoke[1].took)
		vsStandin[n] = float64(*revoke[2].took) / float64(*revoke[1].took)
		noop, engine, direct = noop+*revoke[0].took, engine+*revoke[1].took, direct+*revoke[2].took
		fmt.Fprintf(os.Stderr, "  %d revoked of each\n", to)
		for _, token := range tokens {
			if ev.Active(token) {
				return f, errors.New("a token revoked at the stand-in is still active")
			}
		}
	}
	if err := checkRevoked(ev); err != nil {
		return f, err
	}
	f.EnginePerSec = float64(leases) / engine.Seconds()
	f.NoopPerSec = float64(leases) / noop.Seconds()
	f.StandinPerSec = float64(leases) / direct.Seconds()
	f.VsNoop, f.VsStandin = median(vsNoop), median(vsStandin)
	return f, nil
}

// revokeAtStandin revokes an access token of the direct client as the engine revokes its tokens.
func revokeAtStandin(ctx context.Context, client *http.Client, standinURL, token string) error {
	form := url.Values{"token": {token}, "token_type_hint": {"access_token"}, "client_id": {directClient}, "client_secret": {clientSecret}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, standinURL+"/o/revoke_token/", strings.NewReader(form.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("revoke at the stand-in: %s", resp.Status)
	}
	return nil
}

// goBenchmark is one result line of `go test -bench`.
type goBenchmark struct {
	Name    string   `json:"name"`
	Figures []figure `json:"figures"`
}

type figure struct {
	Value float64 `json:"value"`
	Unit  string  `json:"unit"`
}

// runGoBenchmarks runs the engine's Go benchmarks matching pattern, showing their output as it
// comes, and returns their results.
func runGoBenchmarks(ctx context.Context, pattern string) ([]goBenchmark, error) {
	fmt.Fprintf(os.Stderr, "running the engine's Go benchmarks %s\n", pattern)
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", pattern, "-benchmem", ".")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	var results []goBenchmark
	for lines := bufio.NewScanner(out); lines.Scan(); {
		fmt.Fprintln(os.Stderr, lines.Text())
		fields := strings.Fields(lines.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") || len(fields)%2 != 0 {
			continue
		}
		b := goBenchmark{Name: strings.TrimPrefix(fields[0][:strings.LastIndexByte(fields[0]+"-", '-')], "Benchmark")}
		for i := 2; i+1 < len(fields); i += 2 {
			value, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				return nil, fmt.Errorf("go test printed %q: %v", lines.Text(), err)
			}
			b.Figures = append(b.Figures, figure{value, fields[i+1]})
		}
		results = append(results, b)
	}
	if err := cmd.Wait(); err != nil {
		return nil, fmt.Errorf("go test -bench %s: %w", pattern, err)
	}
	if len(results) == 0 {
		return nil, fmt.Errorf("no Go benchmark matches %s", pattern)
	}
	return results, nil
}

// scaleMarkdown is the -scale report as Markdown.
// msPerOp shows a Go benchmark's ns/op in milliseconds, from a periodic pass's microseconds to a
// load's seconds.
func msPerOp(ns float64) string {
	if ms := ns / 1e6; ms < 100 {
		return fmt.Sprintf("%.3g ms/op", ms)
	}
	return fmt.Sprintf("%.0f ms/op", ns/1e6)
}

func scaleMarkdown(r scaleReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s.\n", r.Machine)
	if len(r.GoBenchmarks) > 0 {
		fmt.Fprintln(&b, "\n#### In process, on logical.InmemStorage (`go test -bench`)")
		fmt.Fprintln(&b, "\n| benchmark | figures |\n|---|---|")
		for _, g := range r.GoBenchmarks {
			var figures []string
			for _, f := range g.Figures {
				switch f.Unit {
				case "ns/op":
					figures = append(figures, msPerOp(f.Value))
				case "B/op", "allocs/op":
				default:
					figures = append(figures, fmt.Sprintf("%.4g %s", f.Value, f.Unit))
				}
			}
			fmt.Fprintf(&b, "| %s | %s |\n", g.Name, strings.Join(figures, ", "))
		}
	}
	fmt.Fprintf(&b, "\n#### One mount on a single-node Raft Vault %s, data on %s, %d concurrent clients\n\n", r.VaultVersion, r.FileSystem, r.Clients)
	fmt.Fprintln(&b, "| figure | measured | floor | ratio | target |\n|---|---:|---:|---:|---|")
	i := r.Import
	fmt.Fprintf(&b, "| importing %d grants (imports through `users/<user>`) | %.0f grants/s (%.0f s) | %.0f kv-v1 writes/s | %.2f | |\n",
		i.Users, i.PerSec, i.Seconds, i.KVWritesPerSec, i.VsKVWrites)
	m := r.Memory
	for _, row := range []struct {
		name string
		m    memory
	}{{"after the import", m.AfterImport}, {"after a start that loaded them", m.AfterStart}} {
		fmt.Fprintf(&b, "| plugin RSS %s (peak) | %.1f MiB (%.1f) | %.1f MiB no-op plugin | %.2f | <= %d MiB |\n",
			row.name, row.m.RSSMiB, row.m.PeakMiB, m.Noop.RSSMiB, row.m.RSSMiB/m.Noop.RSSMiB, m.TargetMiB)
	}
	base := r.Starts[0]
	for _, s := range r.Starts {
		fmt.Fprintf(&b, "| CPU until loaded, unseal with %s: engine, Vault server | %.1f s, %.1f s | %.2f s wall, %d CPUs | | |\n",
			grants(s.Grants), s.EngineCPUS, s.VaultCPUS, s.AllLoadedS, r.Machine.CPUs)
	}
	for _, s := range r.Starts {
		servedFirst := fmt.Sprintf("%d of them held at the first read", s.HeldAtFirstRead)
		fmt.Fprintf(&b, "| unseal with %s stored: first user-token read, all loaded (%s) | %.2f s, %.2f s | %.2f s first no-op read | %.2f, %.2f | <= 15 s, reads before the load ends |\n",
			grants(s.Grants), servedFirst, s.UserReadS, s.AllLoadedS, s.NoopReadS, s.UserReadS/base.NoopReadS, s.AllLoadedS/base.NoopReadS)
	}
	v := r.Revocation
	fmt.Fprintf(&b, "| revoking %d client-credentials leases by prefix | %.0f leases/s | %.0f no-op leases/s; the stand-in's own revocations, one after another: %.0f/s | %.2f; %.3f | |\n",
		v.Leases, v.EnginePerSec, v.NoopPerSec, v.StandinPerSec, v.VsNoop, v.VsStandin)
	fmt.Fprintf(&b, "\nThe starts' ratios are to the first no-op read after the unseal with %s stored; the import's and the revocation's are medians of the rounds' ratios.\n", grants(base.Grants))
	return b.String()
}

func grants(n int) string {
	if n == 1 {
		return "1 grant"
	}
	return fmt.Sprintf("%d grants", n)
}
