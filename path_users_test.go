package evenergy

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

const appRedirect = "https://app.example.com/callback"

// connect runs the whole flow through the application's redirect and users/<user> write.
func (e *accEnv) connect(t *testing.T, user string) {
	t.Helper()
	state, redirect := e.authorize(t, user, appRedirect, true)
	e.write(t, "users/"+user, map[string]any{"code": redirect.Query().Get("code"), "state": state})
}

// dueWindow is a refresh_window a second shorter than 5-minute tokens: such a token is due for a
// refresh at once (a read refreshes 2 s before the window), and the window is not capped at half
// the token's life, as one at least as long as the token would be.
const dueWindow = "299s"

// connectDue connects a user whose first token, of 5 minutes, is already due for a refresh under
// the mount's refresh_window, which it sets to dueWindow; the tokens after it live an hour.
func (e *accEnv) connectDue(t *testing.T, user string) {
	t.Helper()
	e.write(t, "config", map[string]any{"refresh_window": dueWindow})
	e.standin.SetTokenLifetime(5 * time.Minute)
	e.connect(t, user)
	e.standin.SetTokenLifetime(time.Hour)
}

// userTokens are the stand-in's tokens of one user, of one kind, in issue order.
func (e *accEnv) userTokens(user, kind string) []standin.TokenInfo {
	var out []standin.TokenInfo
	for _, info := range e.standin.Tokens() {
		if info.User == user && info.Kind == kind {
			out = append(out, info)
		}
	}
	return out
}

func TestAccUserFlowThroughApplication(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	state, redirect := e.authorize(t, "driver-5", appRedirect, true)
	code := redirect.Query().Get("code")

	e.wantWriteError(t, "users/someone-else", map[string]any{"code": code, "state": state}, http.StatusBadRequest, "for another user")
	e.write(t, "users/driver-5", map[string]any{"code": code, "state": state})

	info, _ := e.standin.Token(e.standinToken(t, e.read(t, "users/driver-5/token")))
	if info.User != "driver-5" {
		t.Fatalf("token of %q", info.User)
	}
	if users := e.users(t); len(users) != 1 || users[0] != "driver-5" {
		t.Fatalf("users = %v", users)
	}
	e.wantWriteError(t, "users/driver-5", map[string]any{"code": code, "state": state}, http.StatusBadRequest, "already used")
	e.wantWriteError(t, "users/driver-5", map[string]any{}, http.StatusBadRequest, "give code and state")
}

func TestAccUserPublicClient(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.standin.AddClient(standin.Client{ID: "public-app", Scopes: testScopes})
	e.write(t, "config", map[string]any{"client_id": "public-app", "client_secret": ""})

	_, redirect := e.authorize(t, "driver-6", e.callbackURL(), true)
	if status, body := page(t, redirect.String()); status != http.StatusOK {
		t.Fatalf("callback %d: %s", status, body)
	}
	info, _ := e.standin.Token(e.standinToken(t, e.read(t, "users/driver-6/token")))
	if info.ClientID != "public-app" {
		t.Fatalf("token of client %q", info.ClientID)
	}
	e.wantReadError(t, "token", http.StatusBadRequest, "no client_secret")
}

func TestAccUserWrongVerifier(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	_, redirect := e.authorize(t, "driver-8", appRedirect, true)
	other := e.write(t, "auth-url/driver-8", map[string]any{"redirect_uri": appRedirect})
	// The code was issued for the first challenge; the second state's verifier does not match it.
	e.wantWriteError(t, "users/driver-8", map[string]any{"code": redirect.Query().Get("code"), "state": other.Data["state"]}, http.StatusBadRequest, "invalid_grant")
	if users := e.users(t); len(users) != 0 {
		t.Fatalf("a wrong verifier stored users %v", users)
	}
}

func TestAccUserRefreshRotates(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.connectDue(t, "driver-9")
	first := e.userTokens("driver-9", "access")[0].Value

	tok := e.standinToken(t, e.read(t, "users/driver-9/token"))
	if tok == first || e.standin.Active(first) {
		t.Fatal("a token due for refresh was not replaced, or the old one is still live")
	}
	refresh := e.userTokens("driver-9", "refresh")
	if len(refresh) != 2 || !refresh[0].Revoked || refresh[1].Revoked {
		t.Fatalf("want the old refresh token rotated out and the new one live, got %d tokens", len(refresh))
	}
	grant := e.read(t, "users/driver-9")
	expiresAt, _ := time.Parse(time.RFC3339, grant.Data["access_token_expires_at"].(string))
	if d := time.Until(expiresAt); d < 59*time.Minute || grant.Data["status"] != "active" {
		t.Fatalf("grant after refresh: %v", grant.Data)
	}
	if again := e.standinToken(t, e.read(t, "users/driver-9/token")); again != tok || len(e.userTokens("driver-9", "access")) != 2 {
		t.Fatal("a token with an hour left was refreshed again")
	}
}

func TestAccUserConcurrentReadsShareOneRefresh(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.connectDue(t, "driver-10")

	const readers = 4
	tokens := make([]string, readers)
	var wg sync.WaitGroup
	for i := range readers {
		wg.Go(func() {
			s, err := e.vault.Logical().Read(e.path("users/driver-10/token"))
			if err != nil {
				t.Error(err)
				return
			}
			tokens[i] = s.Data["access_token"].(string)
		})
	}
	wg.Wait()
	for _, tok := range tokens {
		if tok != tokens[0] || !e.standin.Active(tok) {
			t.Fatal("concurrent readers got different or dead tokens")
		}
	}
	if n := len(e.userTokens("driver-10", "access")); n != 2 {
		t.Fatalf("%d access tokens issued, want the first and exactly one refresh", n)
	}
}

func TestAccUserRefreshedInBackground(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.connectDue(t, "driver-15")
	// Nobody reads the token: Vault's periodic function (every minute) must refresh it.
	eventually(t, 90*time.Second, "a background refresh", func() bool { return len(e.userTokens("driver-15", "access")) == 2 })
	grant := e.read(t, "users/driver-15")
	expiresAt, _ := time.Parse(time.RFC3339, grant.Data["access_token_expires_at"].(string))
	if time.Until(expiresAt) < 58*time.Minute {
		t.Fatalf("the background refresh was not stored: %v", grant.Data)
	}
}

func TestAccUserGrantRevokedAtEvenergy(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.connectDue(t, "driver-11")
	e.write(t, "revoke", map[string]any{"token": e.userTokens("driver-11", "refresh")[0].Value, "token_type_hint": "refresh_token"})

	e.wantReadError(t, "users/driver-11/token", http.StatusBadRequest, "send the user through auth-url again")
	grant := e.read(t, "users/driver-11")
	if grant.Data["status"] != "revoked" || !strings.Contains(grant.Data["last_error"].(string), "invalid_grant") {
		t.Fatalf("grant = %v", grant.Data)
	}
	issued := len(e.standin.Tokens())
	e.wantReadError(t, "users/driver-11/token", http.StatusBadRequest, "send the user through auth-url again")
	if len(e.standin.Tokens()) != issued {
		t.Fatal("a revoked grant was tried at ev.energy again")
	}
	// Connecting the user again heals the grant.
	e.connect(t, "driver-11")
	e.standinToken(t, e.read(t, "users/driver-11/token"))
}

func TestAccUserDeleteRevokesAtEvenergy(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.connect(t, "driver-12")
	if _, err := e.vault.Logical().Delete(e.path("users/driver-12")); err != nil {
		t.Fatal(err)
	}
	for _, info := range e.standin.Tokens() {
		if e.standin.Active(info.Value) {
			t.Fatalf("a %s token is still live after delete", info.Kind)
		}
	}
	if users := e.users(t); len(users) != 0 {
		t.Fatalf("users = %v", users)
	}
	e.wantReadError(t, "users/driver-12/token", http.StatusBadRequest, "no grant for user driver-12: send the user through auth-url first")
}

func TestAccUserImportRefreshToken(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	// The application got this grant itself, outside Vault.
	app := &oauth2.Config{ClientID: testClientID, ClientSecret: testClientSecret, RedirectURL: appRedirect,
		Endpoint: oauth2.Endpoint{AuthURL: e.url + "/o/authorize/", TokenURL: e.url + "/o/token", AuthStyle: oauth2.AuthStyleInParams}}
	verifier := oauth2.GenerateVerifier()
	redirect, err := e.standin.Authorize(t.Context(), app.AuthCodeURL("s", oauth2.S256ChallengeOption(verifier)), "driver-13", true)
	if err != nil {
		t.Fatal(err)
	}
	own, err := app.Exchange(t.Context(), redirect.Query().Get("code"), oauth2.VerifierOption(verifier))
	if err != nil {
		t.Fatal(err)
	}

	e.wantWriteError(t, "users/driver-13", map[string]any{"refresh_token": "not-a-token"}, http.StatusBadRequest, "invalid_grant")
	e.write(t, "users/driver-13", map[string]any{"refresh_token": own.RefreshToken})
	if e.standin.Active(own.RefreshToken) {
		t.Fatal("the imported refresh token is still live: Vault must take the grant over")
	}
	e.standinToken(t, e.read(t, "users/driver-13/token"))
}

func TestAccUserSecretsStayInVault(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.write(t, "config", map[string]any{"refresh_window": dueWindow}) // the first read refreshes
	e.standin.SetTokenLifetime(5 * time.Minute)
	state, redirect := e.authorize(t, "driver-14", appRedirect, true)
	code := redirect.Query().Get("code")
	e.write(t, "users/driver-14", map[string]any{"code": code, "state": state})
	e.standin.SetTokenLifetime(time.Hour)

	var seen []string
	for _, p := range []string{"users/driver-14/token", "users/driver-14", "config"} {
		s := e.read(t, p)
		for k, v := range s.Data {
			seen = append(seen, k+"="+strings.TrimSpace(strings.ReplaceAll(strings.ReplaceAll(toString(v), "\n", ""), " ", "")))
		}
	}
	logBytes, err := os.ReadFile(devVault.log)
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{"client secret": testClientSecret, "authorization code": code}
	for i, info := range e.userTokens("driver-14", "refresh") {
		secrets["refresh token "+string(rune('A'+i))] = info.Value
	}
	for what, value := range secrets {
		if strings.Contains(string(logBytes), value) {
			t.Errorf("the %s appears in Vault's log", what)
		}
		for _, field := range seen {
			if strings.Contains(field, value) {
				t.Errorf("the %s appears in a response", what)
			}
		}
	}
}

func toString(v any) string {
	s, _ := v.(string)
	return s
}

// newUnitStandin configures a unit backend against a real stand-in.
func newUnitStandin(t testing.TB, b *backend, s logical.Storage) *standin.Server {
	t.Helper()
	sv := standin.New()
	sv.AddClient(standin.Client{ID: testClientID, Secret: testClientSecret, Scopes: testScopes})
	server := httptest.NewServer(sv)
	t.Cleanup(server.Close)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": server.URL, "callback_url": unitCallback}); err != nil {
		t.Fatal(err)
	}
	return sv
}

// connectUnitUser connects a user on a unit backend through the stand-in, as an application would.
func connectUnitUser(t testing.TB, b *backend, s logical.Storage, sv *standin.Server, user string) *grant {
	t.Helper()
	resp := newLink(t, b, s, user)
	redirect, err := sv.Authorize(context.Background(), resp.Data["authorize_url"].(string), user, true)
	if err != nil {
		t.Fatal(err)
	}
	resp, err = request(t, b, s, logical.UpdateOperation, "users/"+user, map[string]any{"code": redirect.Query().Get("code"), "state": resp.Data["state"]})
	if err != nil || resp.IsError() {
		t.Fatalf("users write: %v %v", err, resp)
	}
	g, err := getJSON[grant](t.Context(), s, userPrefix+user)
	if err != nil || g == nil {
		t.Fatalf("grant not stored: %v", err)
	}
	return g
}

func TestPeriodicRefreshesOnlyDueUsers(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	long := connectUnitUser(t, b, s, sv, "long") // a 10-hour token
	sv.SetTokenLifetime(30 * time.Minute)
	short := connectUnitUser(t, b, s, sv, "short")
	sv.SetTokenLifetime(10 * time.Hour)
	useFakeClock(b, time.Now().Add(25*time.Minute)) // short is inside the 10-minute window, long far from it
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	shortAfter, _ := getJSON[grant](t.Context(), s, userPrefix+"short")
	longAfter, _ := getJSON[grant](t.Context(), s, userPrefix+"long")
	if shortAfter.AccessToken == short.AccessToken || !sv.Active(shortAfter.AccessToken) || sv.Active(short.RefreshToken) {
		t.Fatal("the periodic function did not refresh the due grant")
	}
	if longAfter.AccessToken != long.AccessToken || !sv.Active(long.AccessToken) {
		t.Fatal("the periodic function refreshed a grant that was not due")
	}
}

func TestStandbyNeverRefreshes(t *testing.T) {
	active, b, s, sv := twoNodes(t)
	_, clock := connectDueUser(t, active, s, sv, "driver")
	useFakeClock(b, clock.Now())
	before := len(sv.Tokens())
	// Vault sets a node's mounts up anew when its replication role changes, so a backend keeps its role.
	b.System().(*logical.StaticSystemView).ReplicationStateVal = consts.ReplicationPerformanceStandby

	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	// A read that needs a refresh is sent on to the active node, which can persist the rotated token.
	if _, err := request(t, b, s, logical.ReadOperation, "users/driver/token", nil); err != logical.ErrReadOnly {
		t.Fatalf("want logical.ErrReadOnly on a performance standby, got %v", err)
	}
	if _, err := request(t, b, s, logical.ReadOperation, "token", nil); err != logical.ErrReadOnly {
		t.Fatalf("token: want logical.ErrReadOnly on a performance standby, got %v", err)
	}
	if _, err := request(t, b, s, logical.UpdateOperation, "users/other", map[string]any{"refresh_token": "x"}); err != logical.ErrReadOnly {
		t.Fatalf("import: want logical.ErrReadOnly on a performance standby, got %v", err)
	}
	if len(sv.Tokens()) != before {
		t.Fatal("a performance standby called ev.energy")
	}
}

// BenchmarkUserTokenRead is the hot path of Vault Agents re-reading a user's token between refreshes.
func BenchmarkUserTokenRead(b *testing.B) {
	be, s := newUnitBackend(b)
	connectUnitUser(b, be, s, newUnitStandin(b, be, s), "driver")
	req := &logical.Request{Operation: logical.ReadOperation, Path: "users/driver/token", Storage: s}
	b.ReportAllocs()
	for b.Loop() {
		if resp, err := be.HandleRequest(context.Background(), req); err != nil || resp.IsError() {
			b.Fatal(err, resp)
		}
	}
}

func TestGrantOfAnotherClientIsNeverSent(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	connectDueUser(t, b, s, sv, "driver")
	sv.AddClient(standin.Client{ID: "other-app", Secret: "other-secret", Scopes: testScopes})
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"client_id": "other-app", "client_secret": "other-secret"}); err != nil || resp.IsError() {
		t.Fatalf("config: %v %v", err, resp)
	}
	issued := len(sv.Tokens())

	resp, err := request(t, b, s, logical.ReadOperation, "users/driver/token", nil)
	if err != logical.ErrInvalidRequest || !strings.Contains(resp.Error().Error(), "made for ev.energy client "+testClientID+", not for the configured client other-app") {
		t.Fatalf("want a 400 naming both clients, got %v %v", resp, err)
	}
	resp, err = request(t, b, s, logical.ReadOperation, "users/driver", nil)
	if err != nil || resp.Data["client_id"] != testClientID || resp.Data["status"] != grantOtherClient {
		t.Fatalf("users/driver = %v %v", resp, err)
	}
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatalf("the periodic function failed on a grant of another client: %v", err)
	}
	if len(sv.Tokens()) != issued {
		t.Fatal("a grant of another client was sent to ev.energy")
	}
	// The retired client's credentials are kept while its grant exists: delete revokes as that client.
	g, _ := getJSON[grant](t.Context(), s, userPrefix+"driver")
	if _, err = request(t, b, s, logical.DeleteOperation, "users/driver", nil); err != nil || sv.Active(g.RefreshToken) {
		t.Fatalf("delete: %v; the grant is active at ev.energy: %v", err, sv.Active(g.RefreshToken))
	}
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"driver"); g != nil {
		t.Fatal("the grant is still stored after delete")
	}
}

// userpass enables a userpass auth method of this test under policy, and returns a login that
// creates a user of that name and logs in as it: a Vault entity's client and its entity ID.
func (e *accEnv) userpass(t *testing.T, policy string) func(name string) (*api.Client, string) {
	t.Helper()
	auth := "userpass-" + strings.TrimPrefix(e.mount, "evenergy-")
	if err := e.vault.Sys().EnableAuthWithOptions(auth, &api.EnableAuthOptions{Type: "userpass"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.vault.Sys().DisableAuth(auth) })
	if err := e.vault.Sys().PutPolicy(e.mount+"-self", policy); err != nil {
		t.Fatal(err)
	}
	return func(name string) (*api.Client, string) {
		t.Helper()
		if _, err := e.vault.Logical().Write("auth/"+auth+"/users/"+name, map[string]any{"password": "pw-" + name, "token_policies": e.mount + "-self"}); err != nil {
			t.Fatal(err)
		}
		c, err := e.vault.Clone()
		if err != nil {
			t.Fatal(err)
		}
		s, err := c.Logical().Write("auth/"+auth+"/login/"+name, map[string]any{"password": "pw-" + name})
		if err != nil {
			t.Fatal(err)
		}
		c.SetToken(s.Auth.ClientToken)
		return c, s.Auth.EntityID
	}
}

// TestAccEntitiesReachOnlyTheirOwnGrant logs two Vault entities in through userpass under one
// templated policy: each authorizes, reads and deletes its own grant and gets 403 on the other's.
func TestAccEntitiesReachOnlyTheirOwnGrant(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	login := e.userpass(t, fmt.Sprintf(`
path "%[1]s/+/{{identity.entity.id}}" { capabilities = ["read", "update", "delete"] }
path "%[1]s/users/{{identity.entity.id}}/*" { capabilities = ["read"] }
`, e.mount))
	alice, aliceID := login("alice")
	bob, bobID := login("bob")

	for _, who := range []struct {
		client     *api.Client
		own, other string
	}{{alice, aliceID, bobID}, {bob, bobID, aliceID}} {
		s, err := who.client.Logical().Write(e.path("auth-url/"+who.own), map[string]any{"redirect_uri": e.callbackURL()})
		if err != nil {
			t.Fatalf("auth-url for one's own entity: %v", err)
		}
		redirect, err := e.standin.Authorize(t.Context(), s.Data["authorize_url"].(string), who.own, true)
		if err != nil {
			t.Fatal(err)
		}
		_, body := page(t, redirect.String())
		if _, err := who.client.Logical().Write(e.path("users/"+who.own), map[string]any{"confirmation_code": pageConfirmationCode(t, body)}); err != nil {
			t.Fatalf("finishing one's own authorization: %v", err)
		}
		tok, err := who.client.Logical().Read(e.path("users/" + who.own + "/token"))
		if err != nil {
			t.Fatalf("reading one's own token: %v", err)
		}
		e.standinToken(t, tok)
	}
	for _, who := range []struct {
		client *api.Client
		other  string
	}{{alice, bobID}, {bob, aliceID}} {
		_, err := who.client.Logical().Write(e.path("auth-url/"+who.other), map[string]any{"redirect_uri": e.callbackURL()})
		wantStatus(t, err, http.StatusForbidden, "permission denied")
		_, err = who.client.Logical().Read(e.path("users/" + who.other + "/token"))
		wantStatus(t, err, http.StatusForbidden, "permission denied")
		_, err = who.client.Logical().Read(e.path("users/" + who.other))
		wantStatus(t, err, http.StatusForbidden, "permission denied")
		_, err = who.client.Logical().Delete(e.path("users/" + who.other))
		wantStatus(t, err, http.StatusForbidden, "permission denied")
	}
	if _, err := alice.Logical().Delete(e.path("users/" + aliceID)); err != nil {
		t.Fatalf("deleting one's own grant: %v", err)
	}
	if users := e.users(t); len(users) != 1 || users[0] != bobID {
		t.Fatalf("users after alice deleted hers: %v", users)
	}
}

// TestSelfMadeLinkIsNeverRelayed relays, as the maker, the code of self-made links another account
// opened: one stored by the previous version with the application's redirect_uri (which that version
// let its maker relay), and one to the callback. Neither gives the maker anything, at users/ or by
// opening the callback with the code herself.
func TestSelfMadeLinkIsNeverRelayed(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	// opened stores a self-made link as the previous version did, and has bob's browser open it.
	opened := func(redirectURI string) (state, code string) {
		t.Helper()
		pending := &authRequest{User: "entity-a", MadeBy: "entity-a", RedirectURI: redirectURI, Verifier: oauth2.GenerateVerifier(), ExpiresAt: time.Now().Add(authRequestTTL)}
		state, _, err := b.putPending(t.Context(), s, pending)
		if err != nil {
			t.Fatal(err)
		}
		cfg, client, err := b.config(t.Context(), s)
		if err != nil {
			t.Fatal(err)
		}
		redirect, err := sv.Authorize(t.Context(), client.authorizeURL(redirectURI, cfg.Scopes, state, pending.Verifier), "bob@example.com", true)
		if err != nil {
			t.Fatal(err)
		}
		return state, redirect.Query().Get("code")
	}
	for _, redirectURI := range []string{appRedirect, unitCallback} {
		state, code := opened(redirectURI)
		resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"code": code, "state": state})
		wantCoded(t, resp, err, http.StatusBadRequest, "completes only at the callback")
	}
	state, code := opened(appRedirect) // the maker opens Vault's callback with the application's redirect
	page, err := request(t, b, s, logical.ReadOperation, "callback", map[string]any{"state": state, "code": code})
	if err != nil || page.Data[logical.HTTPStatusCode] != http.StatusBadRequest || strings.Contains(string(page.Data[logical.HTTPRawBody].([]byte)), "confirmation-code") {
		t.Fatalf("the callback answered %v (%v) to a self-made link to the application, want 400 and no confirmation code", page.Data[logical.HTTPStatusCode], err)
	}
	if len(sv.Tokens()) != 0 {
		t.Fatalf("ev.energy issued %d tokens for relayed codes of self-made links", len(sv.Tokens()))
	}
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a"); g != nil {
		t.Fatal("the maker got a grant by relaying another account's code")
	}
}

// TestUserListShowsWhoMustReconnect lists users with key_info: each grant's status, and for a grant
// ev.energy no longer accepts, when the engine found that out (here after a restore would have put
// back a refresh token ev.energy had rotated since).
func TestUserListShowsWhoMustReconnect(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	connectUnitUser(t, b, s, sv, "kept")
	gone := connectUnitUser(t, b, s, sv, "gone")
	if resp, err := request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": gone.RefreshToken}); err != nil || resp.IsError() {
		t.Fatalf("revoke: %v %v", err, resp)
	}
	found := time.Now().Add(10 * time.Hour).UTC().Truncate(time.Second)
	useFakeClock(b, found) // both tokens are due
	if _, err := request(t, b, s, logical.ReadOperation, "users/gone/token", nil); err == nil {
		t.Fatal("a grant ev.energy refuses gave a token")
	}

	resp, err := request(t, b, s, logical.ListOperation, "users/", nil)
	if err != nil || resp.IsError() {
		t.Fatalf("list: %v %v", err, resp)
	}
	keyInfo, _ := resp.Data["key_info"].(map[string]any)
	goneInfo, _ := keyInfo["gone"].(map[string]any)
	keptInfo, _ := keyInfo["kept"].(map[string]any)
	if goneInfo["status"] != grantRevoked || goneInfo["revoked_at"] != found.Format(time.RFC3339) {
		t.Errorf("key_info of the refused grant = %v, want status revoked and revoked_at %s", goneInfo, found.Format(time.RFC3339))
	}
	if _, has := keptInfo["revoked_at"]; keptInfo["status"] != grantActive || has {
		t.Errorf("key_info of the accepted grant = %v, want status active and no revoked_at", keptInfo)
	}
	if resp, _ := request(t, b, s, logical.ReadOperation, "users/gone", nil); resp.Data["revoked_at"] != goneInfo["revoked_at"] {
		t.Errorf("a read of the refused grant shows revoked_at %v, the list %v", resp.Data["revoked_at"], goneInfo["revoked_at"])
	}
}

// TestUserDeleteWhoseForgetIsRefusedLeasesNoRevokedToken: why: a user's delete revokes the grant at
// ev.energy before it forgets it; when storage refuses the forget, readers must not get leases on
// the revoked token still stored, and a retry of the delete completes it.
func TestUserDeleteWhoseForgetIsRefusedLeasesNoRevokedToken(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g := connectUnitUser(t, b, s, sv, "driver")
	if _, err := request(t, b, refusingDelete{Storage: s, prefix: userPrefix}, logical.DeleteOperation, "users/driver", nil); err == nil {
		t.Fatal("a delete whose forget storage refused answered success")
	}
	if sv.Active(g.AccessToken) {
		t.Fatal("setup: the delete did not revoke the grant before forgetting it")
	}
	if tok, lease, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatalf("a reader got a lease of %v on the user token the delete revoked (same token: %v)", lease, tok == g.AccessToken)
	}
	resp, err := request(t, b, s, logical.DeleteOperation, "users/driver", nil)
	if err != nil || resp.IsError() {
		t.Fatalf("the retried delete failed: %v %v", err, resp)
	}
	if stored, err := getGrant(context.Background(), s, userPrefix+"driver"); err != nil || stored != nil || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("after the retried delete: stored %v (%v), %d revocations queued; want none", stored, err, len(pendingRevocations(t, s)))
	}
}

// TestUserDeleteWhoseMarkIsRefusedRevokesNothing: why: a user's delete marks the grant ended before
// it revokes it; when storage refuses that write, nothing is revoked, the caller gets the error,
// and readers keep the grant, still owned.
func TestUserDeleteWhoseMarkIsRefusedRevokesNothing(t *testing.T) {
	s := &refusingStorage{Storage: &logical.InmemStorage{}}
	b, _, _ := newCountedBackend(t, s)
	sv := newUnitStandin(t, b, s)
	g := connectUnitUser(t, b, s, sv, "driver")
	s.refuse.Store(true)
	if _, err := request(t, b, s, logical.DeleteOperation, "users/driver", nil); err == nil {
		t.Fatal("a delete whose writes storage refused answered success")
	}
	if !sv.Active(g.AccessToken) || !sv.Active(g.RefreshToken) || len(pendingRevocations(t, s)) != 0 {
		t.Fatal("a delete that could not mark the grant ended revoked or queued it")
	}
	s.refuse.Store(false)
	if tok, _, err := readUserToken(t, b, s, "driver"); err != nil || tok != g.AccessToken {
		t.Fatalf("the grant a failed delete left was not served: %v", err)
	}
}
