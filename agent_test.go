package evenergy

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// agent is a real Vault Agent whose template renders one secret's access_token into a file.
type agent struct {
	file  string
	mu    sync.Mutex
	reads []*span // the Agent's reads of the secret, as the proxy it reaches Vault through saw them
}

// span is when one read of a secret was in flight; end is zero while it still is.
type span struct{ start, end time.Time }

func (s *span) holds(at time.Time) bool {
	return !at.Before(s.start) && (s.end.IsZero() || !at.After(s.end))
}

// startAgent starts a Vault Agent rendering the access_token of p, a path of e's mount, and returns
// once it has rendered the first one: only what follows is measured, so a slow machine may start slowly.
// The Agent is killed when the test ends, and its log shown if the test failed.
func startAgent(t *testing.T, e *accEnv, p string) *agent {
	t.Helper()
	dir := t.TempDir()
	a := &agent{file: filepath.Join(dir, "evenergy-token")}

	// A proxy in front of Vault records when the Agent reads the secret, to tell who caused a refresh.
	vaultURL, err := url.Parse(e.vault.Address())
	if err != nil {
		t.Fatal(err)
	}
	proxy, secretPath := httputil.NewSingleHostReverseProxy(vaultURL), "/v1/"+e.path(p)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != secretPath {
			proxy.ServeHTTP(w, r)
			return
		}
		read := &span{start: time.Now()}
		a.mu.Lock()
		a.reads = append(a.reads, read)
		a.mu.Unlock()
		proxy.ServeHTTP(w, r)
		a.mu.Lock()
		read.end = time.Now()
		a.mu.Unlock()
	}))
	t.Cleanup(server.Close)

	tokenFile, config, logPath := filepath.Join(dir, "vault-token"), filepath.Join(dir, "agent.hcl"), filepath.Join(dir, "agent.log")
	if err := os.WriteFile(tokenFile, []byte("root"), 0o600); err != nil {
		t.Fatal(err)
	}
	// At trace level the log shows each read of the secret, the Agent's sleep after it, and whether it kept what it read.
	hcl := fmt.Sprintf(`
log_level = "trace"
vault { address = %q }
auto_auth {
  method "token_file" { config = { token_file_path = %q } }
}
template {
  contents    = "{{ with secret \"%s\" }}{{ .Data.access_token }}{{ end }}"
  destination = %q
}
`, server.URL, tokenFile, e.path(p), a.file)
	if err := os.WriteFile(config, []byte(hcl), 0o600); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(os.Getenv("VAULT_BIN"), "agent", "-config", config)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		// The Agent logs no token values; blanking every token the stand-in issued keeps it so.
		log, _ := os.ReadFile(logPath)
		text := string(log)
		for _, info := range e.standin.Tokens() {
			text = strings.ReplaceAll(text, info.Value, "[redacted "+info.Kind+" token]")
		}
		t.Logf("Vault Agent log:\n%s", text)
	})
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })

	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if tok, err := os.ReadFile(a.file); err == nil && len(tok) > 0 {
			return a
		}
		select {
		case <-exited:
			t.Fatal("Vault Agent exited before its first render")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("Vault Agent rendered nothing within 90 s")
		}
	}
}

// token is the token the Agent's file holds now; the Agent replaces the file whole.
func (a *agent) token(t *testing.T) string {
	t.Helper()
	tok, err := os.ReadFile(a.file)
	if err != nil {
		t.Fatal(err)
	}
	return string(tok)
}

// readAt reports whether one of the Agent's reads of the secret was in flight at that moment.
func (a *agent) readAt(at time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, read := range a.reads {
		if read.holds(at) {
			return true
		}
	}
	return false
}

// readTimes lists when the Agent's reads of the secret started, in seconds from at, from 5 s before it.
func (a *agent) readTimes(at time.Time) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var times []string
	for _, read := range a.reads {
		if d := read.start.Sub(at); d > -5*time.Second {
			times = append(times, fmt.Sprintf("%+.2f", d.Seconds()))
		}
	}
	return strings.Join(times, " ")
}

// TestAccAgentRendersLiveToken runs a real Vault Agent whose template renders evenergy/token: as each
// lease ends with its short-lived token, Agent must have read a new one, so the file never holds a dead token.
func TestAccAgentRendersLiveToken(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.standin.SetTokenLifetime(10 * time.Second)
	a := startAgent(t, e, "token")
	if n := a.liveTokens(t, e, 35*time.Second); n < 3 {
		t.Fatalf("Agent rendered %d tokens in 35 s of 10-second tokens; it should re-read before each one dies", n)
	}
}

// TestAccAgentRendersLiveSharedToken runs a real Vault Agent rendering a shared role across at
// least 3 replacements of 10-second tokens: every lease ends by the replacement, and the replaced
// token lives on until then, so the file never holds a dead token.
func TestAccAgentRendersLiveSharedToken(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.write(t, "config", map[string]any{"refresh_window": "5s"})
	e.write(t, "roles/fleet", map[string]any{"shared": true})
	e.standin.SetTokenLifetime(10 * time.Second)
	a := startAgent(t, e, "token/fleet")
	n := a.liveTokens(t, e, 25*time.Second)
	t.Logf("Agent rendered %d tokens in 25 s, none dead at ev.energy when polled every 50 ms", n)
	if n < 4 {
		t.Fatalf("Agent rendered %d tokens in 25 s of a shared role replacing 10-second tokens every 5 s; want at least 3 replacements", n)
	}
}

// liveTokens polls the Agent's file every 50 ms for that long, fails the test the moment it holds a
// token dead at ev.energy, and returns how many tokens it held.
func (a *agent) liveTokens(t *testing.T, e *accEnv, within time.Duration) int {
	t.Helper()
	seen := map[string]bool{}
	for end := time.Now().Add(within); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		tok := a.token(t)
		if !e.standin.Active(tok) {
			t.Fatalf("the rendered token is dead at ev.energy: Agent did not re-read it in time (%d tokens rendered before)", len(seen))
		}
		seen[tok] = true
	}
	return len(seen)
}

// userRefresh is one refresh of a user's token while the Agent rendered it.
type userRefresh struct {
	at      time.Time     // when ev.energy issued the new token and killed the old one
	byAgent bool          // one of the Agent's reads was in flight then
	closed  bool          // the file has held a live token since
	window  time.Duration // from at until a poll (every 50 ms) found a live token in the file
}

func (r *userRefresh) cause() string {
	if r.byAgent {
		return "by the Agent's read"
	}
	return "between the Agent's reads, by Vault's periodic function"
}

// TestAccAgentRendersLiveUserToken runs a real Vault Agent rendering users/<user>/token across
// refreshes for longer than a tick of Vault's periodic function. ev.energy kills the old token the
// moment Vault refreshes, so the file may hold a dead token only until the Agent's next read, which
// the lease (ending before the planned refresh) keeps close, whichever refreshes the token.
func TestAccAgentRendersLiveUserToken(t *testing.T) {
	t.Parallel()
	// A window of half the lifetime: a lease running on to the token's expiry would leave the file dead for 6-8 s.
	const user, lifetime, window, maxDead = "driver-16", 20 * time.Second, 10 * time.Second, 2 * time.Second
	e := newAccEnv(t)
	e.write(t, "config", map[string]any{"refresh_window": window.String()})
	e.standin.SetTokenLifetime(lifetime)
	e.connect(t, user)
	a := startAgent(t, e, "users/"+user+"/token")

	issuedAt := func(info standin.TokenInfo) time.Time { return info.ExpiresAt.Add(-lifetime) }
	tokens := e.userTokens(user, "access")
	first := a.token(t)
	seen := len(tokens) // the tokens issued up to the first render; later ones are refreshes
	for seen > 0 && tokens[seen-1].Value != first {
		seen--
	}
	if seen == 0 {
		t.Fatal("the Agent rendered a token the stand-in did not issue to the user")
	}

	var refreshes []*userRefresh
	agentReads := func() (n int) {
		for _, r := range refreshes {
			// A read in flight when ev.energy issued the token is the one that caused the refresh.
			if r.byAgent = a.readAt(r.at); r.byAgent && r.closed {
				n++
			}
		}
		return n
	}
	// Longer than Vault's 60-second periodic tick, so a background refresh would have its chance.
	for end := time.Now().Add(65 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		tokens = e.userTokens(user, "access")
		for _, info := range tokens[seen:] {
			refreshes = append(refreshes, &userRefresh{at: issuedAt(info)})
		}
		seen = len(tokens)
		tok := a.token(t)
		live, now := e.standin.Active(tok), time.Now()
		if live {
			for _, r := range refreshes {
				if !r.closed {
					r.closed, r.window = true, now.Sub(r.at)
				}
			}
		} else if died := diedAt(tokens, tok, issuedAt); now.Sub(died) >= maxDead {
			// "Dropped": the Agent ignores a read answered in the same second as its previous one, as
			// consul-template indexes Vault reads by the second, and then sleeps through most of the new lease.
			t.Fatalf("the rendered token has been dead at ev.energy for %.2f s after refresh %d: the Agent did not re-read it in time, or dropped what it read (its reads, in s from the refresh: %s)",
				now.Sub(died).Seconds(), len(refreshes), a.readTimes(died))
		}

		if live && now.After(end) {
			break
		}
	}
	if n := agentReads(); n < 2 {
		t.Fatalf("in 65 s the Agent saw %d refreshes caused by its reads, want at least 2", n)
	}
	for i, r := range refreshes {
		t.Logf("dead-token window after refresh %d (%s): %.2f s", i+1, r.cause(), r.window.Seconds())
		if r.window >= maxDead {
			t.Errorf("refresh %d left the rendered token dead for %.2f s", i+1, r.window.Seconds())
		}
	}
}

// diedAt is when the token stopped being live at ev.energy: when its successor was issued, or when
// it expired; the zero time for a token the stand-in did not issue to the user.
func diedAt(tokens []standin.TokenInfo, tok string, issuedAt func(standin.TokenInfo) time.Time) time.Time {
	for i, info := range tokens {
		switch {
		case info.Value != tok:
		case i+1 < len(tokens):
			return issuedAt(tokens[i+1])
		default:
			return info.ExpiresAt
		}
	}
	return time.Time{}
}
