package evenergy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/vault/sdk/logical"
)

func (e *accEnv) callbackURL() string { return e.vault.Address() + "/v1/" + e.mount + "/callback" }

// authorize starts an authorization at Vault and plays the ev.energy user at the stand-in,
// returning the state and where ev.energy redirected the browser.
func (e *accEnv) authorize(t *testing.T, user, redirectURI string, allow bool) (string, *url.URL) {
	t.Helper()
	s := e.write(t, "auth-url/"+user, map[string]any{"redirect_uri": redirectURI})
	redirect, err := e.standin.Authorize(t.Context(), s.Data["authorize_url"].(string), user, allow)
	if redirect == nil {
		t.Fatalf("authorize at the stand-in: %v", err)
	}
	return s.Data["state"].(string), redirect
}

// page GETs a URL the way a browser follows ev.energy's redirect, returning status and body.
func page(t *testing.T, rawURL string) (int, string) {
	t.Helper()
	resp := get(t, rawURL)
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func (e *accEnv) users(t *testing.T) []any {
	t.Helper()
	s, err := e.vault.Logical().List(e.path("users"))
	if err != nil {
		t.Fatal(err)
	}
	if s == nil {
		return nil
	}
	return s.Data["keys"].([]any)
}

func TestAccCallbackConnectsUser(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	_, redirect := e.authorize(t, "driver-1", e.callbackURL(), true)
	if !strings.HasPrefix(redirect.String(), e.callbackURL()+"?") {
		t.Fatalf("ev.energy redirected to %s://%s%s, not to Vault's callback", redirect.Scheme, redirect.Host, redirect.Path)
	}
	status, body := page(t, redirect.String())
	if status != http.StatusOK || !strings.Contains(body, "Connected") || !strings.Contains(body, "driver-1") {
		t.Fatalf("callback page %d: %s", status, body)
	}

	grant := e.read(t, "users/driver-1")
	if grant.Data["status"] != "active" || grant.Data["scope"] != "charging_session:read vehicle:read" || grant.Data["last_error"] != "" {
		t.Fatalf("grant = %v", grant.Data)
	}
	s := e.read(t, "users/driver-1/token")
	tok := e.standinToken(t, s)
	if info, _ := e.standin.Token(tok); info.User != "driver-1" || info.Grant != "authorization_code" {
		t.Fatalf("token of user %q from grant %q", info.User, info.Grant)
	}
	if s.Renewable || s.LeaseDuration <= 36000-600-5 || s.LeaseDuration > 36000-600 {
		t.Fatalf("lease renewable=%v duration=%d, want it to end at the refresh, 600 s before expiry", s.Renewable, s.LeaseDuration)
	}

	status, body = page(t, redirect.String())
	if status != http.StatusBadRequest || !strings.Contains(body, "unknown, expired, already used") {
		t.Fatalf("a reused state gave %d: %s", status, body)
	}
	if again := e.standinToken(t, e.read(t, "users/driver-1/token")); again != tok {
		t.Fatal("a reused state changed the grant")
	}
	// Ending the lease revokes nothing: the token is the user's, shared by every reader.
	if err := e.vault.Sys().Revoke(s.LeaseID); err != nil || !e.standin.Active(tok) {
		t.Fatalf("lease revoke: %v, token active: %v", err, e.standin.Active(tok))
	}
}

func TestAccCallbackAccessDenied(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	_, redirect := e.authorize(t, "driver-2", e.callbackURL(), false)
	if redirect.Query().Get("error") != "access_denied" {
		t.Fatalf("stand-in redirected with error %q", redirect.Query().Get("error"))
	}
	status, body := page(t, redirect.String())
	if status != http.StatusBadRequest || !strings.Contains(body, "Not connected") || !strings.Contains(body, "access_denied") {
		t.Fatalf("callback page %d: %s", status, body)
	}
	if users := e.users(t); len(users) != 0 {
		t.Fatalf("a denied authorization stored users %v", users)
	}
}

func TestAccCallbackForgedState(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	state, redirect := e.authorize(t, "driver-3", e.callbackURL(), true)
	for _, forgedState := range []string{state + "x", "../" + state, ".."} {
		forged := url.Values{"state": {forgedState}, "code": {redirect.Query().Get("code")}}
		status, body := page(t, e.callbackURL()+"?"+forged.Encode())
		if status != http.StatusBadRequest || !strings.Contains(body, "Not connected") || !strings.Contains(body, "unknown, expired, already used") {
			t.Fatalf("forged state gave %d: %s", status, body)
		}
	}
	if users := e.users(t); len(users) != 0 {
		t.Fatalf("a forged state stored users %v", users)
	}
	// The forgery changed nothing: the real redirect still connects the user.
	if status, body := page(t, redirect.String()); status != http.StatusOK {
		t.Fatalf("real callback after a forged one: %d %s", status, body)
	}
}

func TestAccCallbackExpiredCode(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	_, redirect := e.authorize(t, "driver-4", e.callbackURL(), true)
	e.standin.Advance(61 * time.Second) // codes live 60 s at ev.energy
	status, body := page(t, redirect.String())
	if status != http.StatusBadRequest || !strings.Contains(body, "invalid_grant") {
		t.Fatalf("expired code gave %d: %s", status, body)
	}
	if users := e.users(t); len(users) != 0 {
		t.Fatalf("an expired code stored users %v", users)
	}
}

// barrierStorage refuses relative keys, as Vault's barrier view does.
type barrierStorage struct{ logical.Storage }

func (s barrierStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if strings.Contains(key, "..") {
		return nil, errors.New("relative paths not supported")
	}
	return s.Storage.Get(ctx, key)
}

func TestCallbackRefusesMalformedStateWithAPage(t *testing.T) {
	b, inmem := newUnitBackend(t)
	s := barrierStorage{inmem}
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app"}); err != nil {
		t.Fatal(err)
	}
	for _, state := range []string{"", "..", "../config", "a/b", strings.Repeat("A", 27), "AAAAAAAAAAAAAAAAAAAAAAAAA1", "%00"} {
		resp, err := request(t, b, s, logical.ReadOperation, "callback", map[string]any{"state": state, "code": "c"})
		if err != nil || resp.Data[logical.HTTPStatusCode] != http.StatusBadRequest ||
			!strings.Contains(string(resp.Data[logical.HTTPRawBody].([]byte)), "Not connected") {
			t.Errorf("state %q: want the HTML \"Not connected\" page with 400, got %v %v", state, resp, err)
		}
	}
}

// TestCallbackPageShowsOnlyErrorsItKnows: anyone can write error and error_description into a
// callback URL with a state of her own; the page names only RFC 6749's errors, in its own words.
func TestCallbackPageShowsOnlyErrorsItKnows(t *testing.T) {
	const planted = "Your account is locked, call +44 20 7946 0000"
	for oauthErr, want := range map[string]string{
		"invalid_scope":                  "the link asked for access ev.energy does not grant this application (invalid_scope)",
		"access_denied":                  "You chose not to allow",
		"account_locked_call_the_number": "ev.energy sent back an error this page does not know",
	} {
		b, s, _, state := newPendingBackend(t)
		status, body := servePage(t, b, s, map[string]any{"state": state, "error": oauthErr, "error_description": planted})
		if status != http.StatusBadRequest || !strings.Contains(body, want) {
			t.Errorf("error %s: page %d does not say %q:\n%s", oauthErr, status, want, body)
		}
		for _, text := range []string{htmlText(t, planted), "locked", "account_locked"} {
			if strings.Contains(body, text) {
				t.Errorf("error %s: the page shows %q from its URL", oauthErr, text)
			}
		}
	}
}

// TestConfirmationPageNamesWhoGetsTheAccount: the page of a self-made link names the Vault user
// the account would be connected to, by its logins and a name a person gave it, and the
// application by the config's display_name.
func TestConfirmationPageNamesWhoGetsTheAccount(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"display_name": "Acme Fleet"}); err != nil {
		t.Fatal(err)
	}
	b.System().(*logical.StaticSystemView).EntityVal = &logical.Entity{ID: "entity-a", Name: "entity_1f2e3d4c", Aliases: []*logical.Alias{
		{Name: "mallory", MountType: "userpass"}, {Name: "mallory@example.com", MountType: "oidc"},
	}}
	_, _, page := heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	for _, want := range []string{
		"This connects your ev.energy account to the Vault user mallory (userpass login), mallory@example.com (oidc login). If that is not you, close this page.",
		`enter this code in <span class="app">Acme Fleet</span> yourself`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("the page does not say %q:\n%s", want, page)
		}
	}
	if strings.Contains(page, "entity_1f2e3d4c") {
		t.Error("the page names the entity by the name Vault generated")
	}
	b.System().(*logical.StaticSystemView).EntityVal = &logical.Entity{ID: "entity-a", Name: "Mallory Jones", Aliases: []*logical.Alias{{Name: "mj", MountType: "userpass"}}}
	if _, _, page = heldAtCallback(t, b, s, sv, "entity-a", "carol@example.com"); !strings.Contains(page, "to the Vault user Mallory Jones, mj (userpass login). If that is not you") {
		t.Errorf("the page does not name the entity by the name a person gave it:\n%s", page)
	}
}

// TestCallbackLogCutsURLTextOnARune: error_description from the callback's URL is cut for the log
// on a character boundary, so the log line stays valid UTF-8.
func TestCallbackLogCutsURLTextOnARune(t *testing.T) {
	for _, text := range []string{strings.Repeat("é", 150), "a" + strings.Repeat("€", 100), strings.Repeat("x", 300)} {
		if got := truncated(text); !utf8.ValidString(got) || len(got) > 200+len("…") {
			t.Errorf("truncated(%d bytes) = %d bytes, valid UTF-8: %v", len(text), len(got), utf8.ValidString(got))
		}
	}
	if got := truncated("short"); got != "short" {
		t.Errorf("truncated(short) = %q", got)
	}
}
