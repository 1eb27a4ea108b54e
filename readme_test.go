package evenergy

import (
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// readmeCommand is one `vault` or `bao` command of README.md: a `$ vault ...` line of a shell-session
// block (with its continuation lines), or an inline `vault ...` of its prose, procedure steps and
// tables. A `bao` command is the OpenBao form of a `vault` one (openBaoForms).
type readmeCommand struct {
	line    int    // in README.md
	section string // the heading it is under
	text    string
}

var inlineVault = regexp.MustCompile("`((?:vault|bao) [^`]+)`")

// readmeCommands lists README.md's `vault` and `bao` commands in the order an operator meets them.
func readmeCommands(t *testing.T) []readmeCommand {
	t.Helper()
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(raw), "\n")
	var commands []readmeCommand
	fence, section := "", "" // the info string of the fenced block the line is in; the heading above it
	for i := 0; i < len(lines); i++ {
		line := strings.TrimSpace(lines[i])
		switch {
		case strings.HasPrefix(line, "```"):
			if fence == "" {
				fence = strings.TrimPrefix(line, "```") + " " // a block with no info string is still a block
			} else {
				fence = ""
			}
		case fence == "shell-session " && (strings.HasPrefix(line, "$ vault ") || strings.HasPrefix(line, "$ bao ")):
			start, text := i, strings.TrimPrefix(line, "$ ")
			for strings.HasSuffix(text, `\`) && i+1 < len(lines) {
				i++
				text = strings.TrimSpace(strings.TrimSuffix(text, `\`)) + " " + strings.TrimSpace(lines[i])
			}
			commands = append(commands, readmeCommand{line: start + 1, section: section, text: text})
		case fence == "" && strings.HasPrefix(line, "#"):
			section = strings.TrimSpace(strings.TrimLeft(line, "#"))
		case fence == "" && line != "":
			// A paragraph, list or table goes on to a blank line, a heading or a block, and a
			// backticked command may go on to the next line.
			start, text, offsets := i, line, []int{0} // offsets: where each line starts in text
			for i+1 < len(lines) && goesOn(lines[i+1]) {
				i++
				text += " "
				offsets = append(offsets, len(text))
				text += strings.TrimSpace(lines[i])
			}
			for _, m := range inlineVault.FindAllStringSubmatchIndex(text, -1) {
				n, _ := slices.BinarySearch(offsets, m[0]+1) // the lines starting at or before the command
				commands = append(commands, readmeCommand{line: start + n, section: section, text: text[m[2]:m[3]]})
			}
		}
	}
	return commands
}

// goesOn reports whether a line carries on the paragraph, list or table above it.
func goesOn(line string) bool {
	line = strings.TrimSpace(line)
	return line != "" && !strings.HasPrefix(line, "#") && !strings.HasPrefix(line, "```")
}

// TestReadmeCommandsAreFound pins what readmeCommands takes from the README: commands in sessions,
// with their continuation lines, and inline ones in steps, prose (one may go on to the next line)
// and tables, each with its line.
func TestReadmeCommandsAreFound(t *testing.T) {
	commands := readmeCommands(t)
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(raw), "\n")
	for _, want := range []string{
		`vault secrets enable -path=evenergy -plugin-version="$VERSION" -default-lease-ttl=1h -allowed-response-headers=Retry-After vault-plugin-secrets-evenergy`,
		`vault write sys/plugins/reload/backend mounts=evenergy/`,
		`vault operator raft snapshot restore evenergy.snap`,
		`vault lease revoke -prefix evenergy/token/agents`,
		`vault write evenergy/users/driver-42 refresh_token=@refresh-token.txt`,
		`vault secrets tune -default-lease-ttl=1h evenergy/`,
		`bao plugin reload -mounts=evenergy/`,
	} {
		i := slices.IndexFunc(commands, func(c readmeCommand) bool { return c.text == want })
		if i < 0 {
			t.Errorf("the README's commands do not include %q", want)
			continue
		}
		if start := strings.Join(strings.Fields(want)[:3], " "); !strings.Contains(lines[commands[i].line-1], start) {
			t.Errorf("%q is found at README.md:%d, which is %q", want, commands[i].line, lines[commands[i].line-1])
		}
	}
	for _, c := range commands {
		if strings.Contains(c.text, "vault plugin reload") && readmeFailures[c.text] == nil {
			t.Errorf("README.md:%d shows %q, which calls sys/plugins/reload/unknown without a namespace, as working", c.line, c.text)
		}
	}
}

// TestAccReadmePolicies writes the README's policies to a real Vault, which must take them, and
// checks what the operator's allows: users' grants but not their tokens, and the sudo that
// `vault lease revoke -prefix` needs.
func TestAccReadmePolicies(t *testing.T) {
	t.Parallel()
	vault := testVault(t)
	raw, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(raw), "\n### Policies\n")
	section, _, _ = strings.Cut(section, "\n### ")
	blocks := regexp.MustCompile("(?s)```hcl\n(.*?)```").FindAllStringSubmatch(section, -1)
	if len(blocks) < 3 {
		t.Fatalf("the README's Policies section has %d hcl blocks, want the operator's, the application's and the templated one", len(blocks))
	}
	for i, block := range blocks {
		name := fmt.Sprintf("readme-policy-%d", i)
		if err := vault.Sys().PutPolicy(name, block[1]); err != nil {
			t.Fatalf("Vault refuses the README's policy %d: %v\n%s", i, err, block[1])
		}
		t.Cleanup(func() { _ = vault.Sys().DeletePolicy(name) })
	}
	token, err := vault.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{"readme-policy-0"}, NoDefaultPolicy: true, TTL: "10m"})
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string][]string{
		"evenergy/users/driver-42":                                {"delete", "read"},
		"evenergy/users/driver-42/token":                          {"deny"},
		"sys/leases/revoke-prefix/evenergy/users/driver-42/token": {"sudo", "update"},
	} {
		got, err := vault.Sys().Capabilities(token.Auth.ClientToken, path)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("the README's operator policy gives %v on %s, want %v", got, path, want)
		}
	}
}

// readmeWarnings are the commands whose Vault warning is what the README shows them for.
var readmeWarnings = map[string]string{
	"vault write -f evenergy/check-grants": "it warns that each refresh ends the token readers hold",
	`vault list -format=json evenergy/users | jq -r '.[]' | xargs -I{} vault delete evenergy/users/{}`: "each delete warns until when leases of the revoked grant's token may run",
	`vault list -format=json evenergy/roles | jq -r '.[]' | xargs -I{} vault delete evenergy/roles/{}`: "a shared role's delete warns that leases still name its revoked token",
	"vault write -f evenergy/rotate-role/agents":                                                       "it warns that leases still name the revoked token",
	"vault delete evenergy/users/driver-42":                                                            "it warns until when leases of the revoked grant's token may run",
	`vault write evenergy/revocations include_deferred=true   # until it shows "pending" 0`:            "it revokes deferred records early, as it is meant to, and warns that their leases' readers hold dead tokens",
}

// readmeFailures are the commands the README shows failing on Vault, with what their output must hold.
var readmeFailures = map[string][]string{
	// Without a namespace the CLI calls the wrong path. Compatibility says it works within one, which
	// Community Edition, which the tests run, does not have.
	"vault plugin reload -mounts=evenergy/": {"sys/plugins/reload/unknown", "unsupported path"},
}

// openBaoForms are the README's commands that differ on OpenBao, each with the form Compatibility
// shows for it, which the test runs in its place on OpenBao. Vault has no `bao` CLI.
var openBaoForms = map[string]string{
	`vault plugin register -sha256="$(grep " $BINARY\$" SHA256SUMS | cut -d' ' -f1)" -command="$BINARY" -version="$VERSION" -env HTTPS_PROXY=http://proxy.example.com:3128 -env GOMEMLIMIT=200MiB secret vault-plugin-secrets-evenergy`: `bao write sys/plugins/catalog/secret/vault-plugin-secrets-evenergy sha256="$(grep " $BINARY\$" SHA256SUMS | cut -d' ' -f1)" command="$BINARY" version="$VERSION" env=HTTPS_PROXY=http://proxy.example.com:3128 env=GOMEMLIMIT=200MiB`,
	"vault plugin reload -mounts=evenergy/": "bao plugin reload -mounts=evenergy/",
}

// TestAccReadmeCommands runs every `vault` command of README.md in order, as an operator would (the
// disable last), with their OpenBao forms in their place on OpenBao (openBaoForms),
// against a single-node Raft Vault (the restore needs snapshots) with the plugin and
// the stand-in as ev.energy. Each must exit 0 without a warning from Vault, or fail as the README
// says, and have the effect the README gives it: a reload runs the new version, a restore lists as
// revoked the users refreshed since the snapshot, a renewal keeps the token, a delete revokes the
// grant, and so on (the hooks below). Not run, as they are not Vault's: checking and installing the
// release on every node (sha256sum, install; the test builds both versions into the one node's
// plugin directory), what happens at ev.energy (a new secret, a user's consent: the hooks below),
// and the HCL of Terraform and Vault Agent.
func TestAccReadmeCommands(t *testing.T) {
	// The disable ends the mount, so the commands the README shows after it run before it.
	var commands, disabling []readmeCommand
	for _, c := range readmeCommands(t) {
		if c.section == "Disabling a mount" {
			disabling = append(disabling, c)
		} else {
			commands = append(commands, c)
		}
	}
	commands = append(commands, disabling...)
	onOpenBao := openBao(t)
	cluster := startRaftCluster(t, 1)
	vault := cluster.active(t).client
	work := t.TempDir()

	// What the README leaves to the operator: the release's files, and ev.energy.
	version := "v" + releaseVersion(t)
	newVersion := version + ".1"
	binary, newBinary := pluginName+"_"+version+"_linux_amd64", pluginName+"_"+newVersion+"_linux_amd64"
	var sums strings.Builder
	for name, v := range map[string]string{binary: version, newBinary: newVersion} {
		fmt.Fprintf(&sums, "%s  %s\n", buildVersionedPlugin(t, name, v), name)
	}
	const secret, newSecret = "abc-secret", "new-secret"
	for name, content := range map[string]string{
		"SHA256SUMS": sums.String(), "client-secret.txt": secret + "\n", "new-secret.txt": newSecret + "\n", // as echo writes them
	} {
		if err := os.WriteFile(filepath.Join(work, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ev := standin.New()
	ev.AddClient(standin.Client{ID: "abc123", Secret: secret, Scopes: testScopes})
	ev.AddClient(standin.Client{ID: "new-app", Secret: newSecret, Scopes: testScopes})
	evServer := httptest.NewServer(ev)
	t.Cleanup(evServer.Close)

	// The placeholders: shell variables the README sets or names, and text standing for what only
	// the operator's site has.
	env := append(os.Environ(), "VAULT_ADDR="+vault.Address(), "VAULT_TOKEN="+vault.Token(), "VAULT_MAX_RETRIES=0", "VAULT_FORMAT=table",
		"PATH="+filepath.Dir(vaultOnPath(t))+":"+os.Getenv("PATH"),
		"VERSION="+version, "BINARY="+binary, "OLD="+version, "NEW="+newVersion, "NEW_BINARY="+newBinary)
	replacements := []string{
		"https://vault.example.com", vault.Address(), // this Vault, where the callback is
		"evenergy/config client_id=abc123", "evenergy/config base_url=" + evServer.URL + " client_id=abc123", // the stand-in is ev.energy
		"evenergy/users/<user>", "evenergy/users/driver-42", // the README's example user
	}
	// The placeholders only the run so far can fill: the last lease a command handed out, and the code
	// and state ev.energy sent an application.
	filled := map[string]string{}
	var leasedToken string // the access token of filled["<lease_id>"]

	// What happens between the commands, outside Vault: users at ev.energy, and the checks of each
	// procedure's end. Keyed by the README's command, which must exist.
	var refreshedAtSnapshot map[string]bool // the stand-in's refreshed access tokens when the snapshot was taken
	var lostInRestore []string
	var sharedToken, importedToken, deletedGrant string
	before := map[string]func(){
		"vault lease revoke -prefix evenergy/token/agents": func() {
			s, err := vault.Logical().Read("evenergy/token/agents")
			if err != nil {
				t.Fatal(err)
			}
			sharedToken = s.Data["access_token"].(string)
		},
		"vault write evenergy/users/driver-42 code=... state=...": func() { // the application's redirect_uri gets them
			s, err := vault.Logical().Write("evenergy/auth-url/driver-42", map[string]any{"redirect_uri": "https://app.example.com/evenergy"})
			if err != nil {
				t.Fatal(err)
			}
			redirect, err := ev.Authorize(context.Background(), s.Data["authorize_url"].(string), "driver-42", true)
			if err != nil {
				t.Fatal(err)
			}
			filled["code=... state=..."] = "code=" + redirect.Query().Get("code") + " state=" + redirect.Query().Get("state")
		},
		"vault write evenergy/users/driver-42 refresh_token=@refresh-token.txt": func() { // a grant made outside Vault
			var err error
			if importedToken, err = ev.IssueUserGrant("abc123", "driver-42", "vehicle:read"); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(work, "refresh-token.txt"), []byte(importedToken+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"vault delete evenergy/users/driver-42": func() {
			for _, tok := range ev.Tokens() { // Vault's refresh token is the last one ev.energy issued for the user
				if tok.User == "driver-42" && tok.Kind == "refresh" {
					deletedGrant = tok.Value
				}
			}
			if !ev.Active(deletedGrant) {
				t.Fatal("driver-42 has no grant at ev.energy to delete")
			}
		},
		"vault read evenergy/users/<user>": func() { importUser(t, vault, ev, "driver-42") }, // deleted above
		"vault operator raft snapshot save evenergy.snap": func() {
			for _, user := range []string{"restore-kept", "restore-rotated"} {
				importUser(t, vault, ev, user)
			}
		},
		"vault write evenergy/config client_secret=@new-secret.txt": func() { // 1. Get the new secret from ev.energy.
			ev.AddClient(standin.Client{ID: "abc123", Secret: newSecret, Scopes: testScopes})
		},
		"vault operator raft snapshot restore evenergy.snap": func() {
			lostInRestore = refreshedSince(ev, refreshedAtSnapshot)
			if !slices.Contains(lostInRestore, "restore-rotated") {
				t.Fatalf("the users refreshed since the snapshot are %v, which lacks restore-rotated", lostInRestore)
			}
		},
		"vault read evenergy/check-grants": func() {
			eventually(t, 3*time.Minute, "the check of every grant to end", func() bool {
				s, err := vault.Logical().Read("evenergy/check-grants")
				return err == nil && fmt.Sprint(s.Data["pending"]) == "0"
			})
		},
	}
	after := map[string]func(stdout string){
		"vault lease renew <lease_id>": func(string) {
			if !ev.Active(leasedToken) {
				t.Fatal("the renewal did not keep the lease's token")
			}
		},
		"vault lease revoke <lease_id>": func(string) {
			eventually(t, time.Minute, "the revoked lease's token to be revoked at ev.energy", func() bool { return !ev.Active(leasedToken) })
		},
		"vault lease revoke -prefix evenergy/token/agents": func(string) {
			eventually(t, time.Minute, "the shared role's leases to end", func() bool {
				s, err := vault.Logical().List("sys/leases/lookup/evenergy/token/agents")
				return err == nil && s == nil
			})
			if !ev.Active(sharedToken) {
				t.Fatal("ending the shared role's leases revoked its token")
			}
		},
		`vault write evenergy/auth-url/driver-42 redirect_uri=https://vault.example.com/v1/evenergy/callback`: func(stdout string) {
			authorizeURL := tableValue(stdout, "authorize_url")
			if authorizeURL == "" {
				t.Fatalf("no authorize_url in:\n%s", withoutSecrets(stdout))
			}
			callback, err := ev.Authorize(context.Background(), authorizeURL, "driver-42", true) // the user consents
			if err != nil {
				t.Fatal(err)
			}
			if resp := get(t, callback.String()); resp.StatusCode != http.StatusOK {
				t.Fatalf("the callback answered %d", resp.StatusCode)
			}
		},
		"vault write evenergy/users/driver-42 refresh_token=@refresh-token.txt": func(string) {
			if ev.Active(importedToken) {
				t.Fatal("the imported refresh token still works at ev.energy: Vault did not refresh it at once")
			}
		},
		"vault read evenergy/users/driver-42": func(stdout string) {
			if tableValue(stdout, "status") != grantActive {
				t.Fatalf("no active status in:\n%s", withoutSecrets(stdout))
			}
			for _, tok := range ev.Tokens() {
				if strings.Contains(stdout, tok.Value) {
					t.Fatalf("the grant's read shows a %s token of %s", tok.Kind, cmp.Or(tok.User, "the client"))
				}
			}
		},
		"vault delete evenergy/users/driver-42": func(string) {
			if ev.Active(deletedGrant) {
				t.Fatal("the deleted user's grant still works at ev.energy")
			}
		},
		"vault read evenergy/users/<user>": func(stdout string) {
			if tableValue(stdout, "refresh_at") == "" {
				t.Fatalf("no refresh_at in:\n%s", withoutSecrets(stdout))
			}
		},
		"vault secrets tune -allowed-response-headers=Retry-After evenergy/": func(string) {
			// Longer than request_timeout, so the engine passes it on instead of waiting.
			ev.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: 45 * time.Second, Count: 1})
			defer ev.SetFault(standin.Fault{})
			req, err := http.NewRequest(http.MethodGet, vault.Address()+"/v1/evenergy/token", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("X-Vault-Token", vault.Token())
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "45" {
				t.Fatalf("got HTTP %d with Retry-After %q, want 429 with 45", resp.StatusCode, resp.Header.Get("Retry-After"))
			}
		},
		"vault read evenergy/metrics": func(stdout string) {
			if !strings.Contains(stdout, "evenergy_tokens_minted_total") || strings.Contains(stdout, "# TYPE") {
				t.Fatalf("not the JSON series:\n%s", stdout)
			}
		},
		"vault operator raft snapshot save evenergy.snap": func(string) {
			refreshedAtSnapshot = map[string]bool{}
			for _, tok := range ev.Tokens() {
				refreshedAtSnapshot[tok.Value] = true
			}
			// Vault refreshes restore-rotated's grant after the snapshot, as a reader's refresh would.
			importUser(t, vault, ev, "restore-rotated")
		},
		"vault list -detailed evenergy/users": func(stdout string) {
			if revoked := revokedUsers(t, stdout); !slices.Equal(revoked, lostInRestore) {
				t.Fatalf("the list shows %v revoked; the users refreshed since the snapshot restored are %v:\n%s", revoked, lostInRestore, stdout)
			}
		},
		`vault secrets list -detailed        # the mount's running version is $NEW`: func(string) {
			mount, err := vault.Logical().Read("sys/mounts/evenergy")
			if err != nil {
				t.Fatal(err)
			}
			if got := mount.Data["running_plugin_version"]; got != newVersion {
				t.Fatalf("after the upgrade the mount runs %v, want %s", got, newVersion)
			}
		},
	}
	texts := map[string]bool{}
	for _, c := range commands {
		texts[c.text] = true
	}
	for _, keys := range [][]string{slices.Collect(maps.Keys(before)), slices.Collect(maps.Keys(after)), slices.Collect(maps.Keys(readmeWarnings)),
		slices.Collect(maps.Keys(readmeFailures)), slices.Collect(maps.Keys(openBaoForms)), slices.Collect(maps.Values(openBaoForms))} {
		for _, k := range keys {
			if !texts[k] {
				t.Fatalf("this test acts around the README command %q, which the README no longer has", k)
			}
		}
	}
	for text := range texts {
		if strings.HasPrefix(text, "bao ") && !slices.Contains(slices.Collect(maps.Values(openBaoForms)), text) {
			t.Fatalf("the README shows %q, which openBaoForms does not run in place of a vault command", text)
		}
	}

	for _, c := range commands {
		if strings.HasPrefix(c.text, "bao ") {
			continue // run in place of its vault command, on OpenBao
		}
		if hook := before[c.text]; hook != nil {
			hook()
		}
		text, failure := c.text, readmeFailures[c.text]
		if form, ok := openBaoForms[c.text]; ok && onOpenBao {
			text, failure = form, nil
		}
		for i := 0; i < len(replacements); i += 2 {
			text = strings.ReplaceAll(text, replacements[i], replacements[i+1])
		}
		for placeholder, value := range filled {
			text = strings.ReplaceAll(text, placeholder, value)
		}
		cmd := exec.Command("bash", "-c", "set -o pipefail; "+text)
		cmd.Dir, cmd.Env = work, env
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		out := stdout.String() + stderr.String()
		if want := failure; want != nil {
			if err == nil || slices.ContainsFunc(want, func(w string) bool { return !strings.Contains(out, w) }) {
				t.Fatalf("README.md:%d: %s: want it to fail saying %q, got %v:\n%s", c.line, c.text, want, err, withoutSecrets(out))
			}
			continue
		}
		if err != nil {
			t.Fatalf("README.md:%d: %s: %v\n%s", c.line, c.text, err, withoutSecrets(out))
		}
		if strings.Contains(out, "WARNING") && readmeWarnings[c.text] == "" {
			t.Fatalf("README.md:%d: %s: Vault warned:\n%s", c.line, c.text, withoutSecrets(out))
		}
		if id, token := tableValue(stdout.String(), "lease_id"), tableValue(stdout.String(), "access_token"); id != "" && token != "" {
			filled["<lease_id>"], leasedToken = id, token
		}
		if hook := after[c.text]; hook != nil {
			hook(stdout.String())
		}
	}
}

// tableValue is the value of a row of a command's table output, or "".
func tableValue(out, key string) string {
	if m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + `\s+(\S+)$`).FindStringSubmatch(out); m != nil {
		return m[1]
	}
	return ""
}

// secretValue is a token, state or authorization link in a command's table output.
var secretValue = regexp.MustCompile(`(?m)^((?:access_token|authorize_url|state)\s+)\S+`)

// withoutSecrets is a command's output fit for the test log.
func withoutSecrets(out string) string { return secretValue.ReplaceAllString(out, "${1}<redacted>") }

// buildVersionedPlugin builds the race-built plugin stamped with version into the plugin directory
// under a release's name, and returns its sha256.
func buildVersionedPlugin(t *testing.T, name, version string) string {
	t.Helper()
	dir, _, err := racePlugin()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, name)
	build := exec.Command("go", "build", "-race", "-ldflags", "-X "+versionVar+"="+version, "-o", bin, "./cmd/"+pluginName)
	build.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", name, err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(data))
}

// vaultOnPath is a directory's `vault`, and `bao`: VAULT_BIN, as the README's commands call it.
func vaultOnPath(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{"vault", "bao"} {
		if err := os.Symlink(os.Getenv("VAULT_BIN"), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "vault")
}

// importUser has Vault import the user's current refresh token at the stand-in, or a new grant:
// Vault refreshes it at once, so the refresh token the grant held before is rotated away.
func importUser(t *testing.T, vault *api.Client, ev *standin.Server, user string) {
	t.Helper()
	var refreshToken string
	for _, tok := range ev.Tokens() {
		if tok.User == user && tok.Kind == "refresh" && !tok.Revoked {
			refreshToken = tok.Value
		}
	}
	if refreshToken == "" {
		var err error
		if refreshToken, err = ev.IssueUserGrant("abc123", user, "vehicle:read"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := vault.Logical().Write("evenergy/users/"+user, map[string]any{"refresh_token": refreshToken}); err != nil {
		t.Fatalf("importing %s: %v", user, err)
	}
}

// refreshedSince lists, sorted, the users whose grant the stand-in refreshed after it held known.
func refreshedSince(ev *standin.Server, known map[string]bool) []string {
	var users []string
	for _, tok := range ev.Tokens() {
		if tok.Grant == "refresh_token" && tok.Kind == "access" && !known[tok.Value] && !slices.Contains(users, tok.User) {
			users = append(users, tok.User)
		}
	}
	slices.Sort(users)
	return users
}

// revokedUsers reads `vault list -detailed`'s table: the users whose status is revoked, sorted.
func revokedUsers(t *testing.T, table string) []string {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(table), "\n")
	header := strings.Fields(lines[0])
	status := slices.Index(header, "status")
	if status < 0 {
		t.Fatalf("no status column in:\n%s", table)
	}
	var revoked []string
	for _, line := range lines[1:] {
		if fields := strings.Fields(line); len(fields) == len(header) && fields[status] == grantRevoked {
			revoked = append(revoked, fields[0])
		}
	}
	slices.Sort(revoked)
	return revoked
}

func TestWithoutSecrets(t *testing.T) {
	out := withoutSecrets("lease_duration     1h\naccess_token       K8hGUZTX\nstate            VQ6Z\nauthorize_url    https://x/?state=VQ6Z\n")
	if strings.Contains(out, "K8hGUZTX") || strings.Contains(out, "VQ6Z") || !strings.Contains(out, "lease_duration     1h") {
		t.Fatalf("withoutSecrets left a secret or lost the rest:\n%s", out)
	}
}
