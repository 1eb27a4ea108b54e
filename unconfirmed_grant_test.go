package evenergy

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"golang.org/x/oauth2"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// confirmationCodeOnPage is where the callback page shows a confirmation code.
var confirmationCodeOnPage = regexp.MustCompile(`id="confirmation-code"[^>]*>([A-Z2-7-]+)<`)

// pageConfirmationCode is the confirmation code a callback page shows.
func pageConfirmationCode(t *testing.T, page string) string {
	t.Helper()
	m := confirmationCodeOnPage.FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("the callback page shows no confirmation code; it reads:\n%s", page)
	}
	return m[1]
}

// selfServicePolicy is the README's policy for every user, on this test's mount.
func (e *accEnv) selfServicePolicy() string {
	return strings.ReplaceAll(`
path "evenergy/auth-url/{{identity.entity.id}}"    { capabilities = ["update"] }
path "evenergy/users/{{identity.entity.id}}"       { capabilities = ["update", "read", "delete"] }
path "evenergy/users/{{identity.entity.id}}/token" { capabilities = ["read"] }
`, "evenergy/", e.mount+"/")
}

// TestAccSelfServiceLinkTakesNoOtherAccount is the takeover of issues 18 and 25 on a real Vault
// under the README's self-service policy, with approval_prompt=auto: Vault user A makes a link for
// herself and driver B, connected already, opens it. A must not get B's account, neither from the
// callback, nor by relaying B's code, nor through a link to the application's redirect_uri (which
// auth-url refuses, and which an earlier version stored). A's own link still connects A with its
// confirmation code, and links root or a trusted application make for a user connect in one visit.
func TestAccSelfServiceLinkTakesNoOtherAccount(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	login := e.userpass(t, e.selfServicePolicy())
	alice, aliceID := login("alice")
	bob, bobID := login("bob")
	const aliceAccount, bobAccount = "alice@example.com", "bob@example.com"

	// link has an entity make a link for itself to the callback.
	link := func(c *api.Client, id string) (state, authorizeURL string) {
		t.Helper()
		s, err := c.Logical().Write(e.path("auth-url/"+id), map[string]any{"redirect_uri": e.callbackURL()})
		if err != nil {
			t.Fatalf("auth-url for one's own entity: %v", err)
		}
		if s.Data["completion"] != completionConfirmationCode {
			t.Errorf("auth-url says the link completes by %v, want %s", s.Data["completion"], completionConfirmationCode)
		}
		return s.Data["state"].(string), s.Data["authorize_url"].(string)
	}
	// confirm opens the entity's own link in browser as account, and writes back the page's code.
	confirm := func(c *api.Client, id string, browser *standin.Browser, account string) string {
		t.Helper()
		_, authorizeURL := link(c, id)
		redirect, err := browser.Authorize(t.Context(), authorizeURL, account, true)
		if err != nil {
			t.Fatal(err)
		}
		status, body := page(t, redirect.String())
		if status != http.StatusOK {
			t.Fatalf("the callback page of %s's own link answered %d", account, status)
		}
		code := pageConfirmationCode(t, body)
		if _, err := c.Logical().Write(e.path("users/"+id), map[string]any{"confirmation_code": code}); err != nil {
			t.Fatalf("%s confirming her own link with the code alone: %v", account, err)
		}
		return code
	}
	// readAccount reads the entity's token, and the ev.energy account it is of ("" when none).
	readAccount := func(c *api.Client, id string) string {
		t.Helper()
		s, err := c.Logical().Read(e.path("users/" + id + "/token"))
		if err != nil {
			return ""
		}
		info, _ := e.standin.Token(e.standinToken(t, s))
		return info.User
	}

	// A self-made link to the application's redirect URI is refused.
	_, err := alice.Logical().Write(e.path("auth-url/"+aliceID), map[string]any{"redirect_uri": appRedirect})
	wantStatus(t, err, http.StatusBadRequest, "have a trusted application make the link with its own Vault token")

	// B connects with her own link and its code, and stays logged in at ev.energy.
	bobBrowser := standin.NewBrowser()
	bobsCode := confirm(bob, bobID, bobBrowser, bobAccount)
	if account := readAccount(bob, bobID); account != bobAccount {
		t.Fatalf("B's token is of account %q", account)
	}

	// A self-made link to the application, stored as version 0.3 stored it, opened by B: the
	// application in B's session is refused, and so is A relaying the code, at users/ or at the callback.
	stored := func() (state string, redirect *url.URL) {
		t.Helper()
		verifier := oauth2.GenerateVerifier()
		expiresAt := time.Now().Add(authRequestTTL).UTC()
		name := strconv.FormatInt(expiresAt.UnixNano(), 10) + "-" + rand.Text()
		e.putStored(t, authRequestPrefix+pendingTag(aliceID)+"/"+name, authRequest{User: aliceID, RedirectURI: appRedirect, Verifier: verifier, ExpiresAt: expiresAt, MadeBy: aliceID})
		state = pendingTag(aliceID) + "-" + name
		app := oauth2.Config{ClientID: testClientID, Endpoint: oauth2.Endpoint{AuthURL: e.url + "/o/authorize/"}, RedirectURL: appRedirect}
		redirect, _ = bobBrowser.Authorize(t.Context(), app.AuthCodeURL(state, oauth2.S256ChallengeOption(verifier))+"&approval_prompt=auto", bobAccount, false)
		if redirect == nil || !redirect.Query().Has("code") {
			t.Fatal("ev.energy showed B a consent page for approval_prompt=auto")
		}
		return state, redirect
	}
	state, redirect := stored()
	_, err = bob.Logical().Write(e.path("users/"+aliceID), map[string]any{"code": redirect.Query().Get("code"), "state": state})
	wantStatus(t, err, http.StatusForbidden, "permission denied")
	_, err = alice.Logical().Write(e.path("users/"+aliceID), map[string]any{"code": redirect.Query().Get("code"), "state": state})
	wantStatus(t, err, http.StatusBadRequest, "completes only at the callback")
	state, redirect = stored()
	status, body := page(t, e.callbackURL()+"?"+redirect.RawQuery)
	if status != http.StatusBadRequest || confirmationCodeOnPage.MatchString(body) {
		t.Errorf("the callback answered %d to A's self-made application link, want 400 and no confirmation code", status)
	}
	if account := readAccount(alice, aliceID); account != "" {
		t.Fatalf("A reads a token of account %q after relaying B's code of a self-made application link", account)
	}

	// A's link to the callback, opened in B's browser: B clicks nothing (were a consent page shown,
	// allow=false would deny), and her browser follows ev.energy's redirect to Vault's callback.
	state, authorizeURL := link(alice, aliceID)
	redirect, _ = bobBrowser.Authorize(t.Context(), authorizeURL+"&approval_prompt=auto", bobAccount, false)
	if redirect == nil || !redirect.Query().Has("code") {
		t.Fatal("ev.energy showed B a consent page for approval_prompt=auto")
	}
	status, body = page(t, redirect.String())
	if account := readAccount(alice, aliceID); account != "" {
		t.Fatalf("A reads a token of account %q after B opened her link (callback page %d)", account, status)
	}
	if status != http.StatusOK || !strings.Contains(body, "Never give this code to anyone") {
		t.Errorf("B's callback page %d does not tell her to keep the code", status)
	}
	bobsHeldCode := pageConfirmationCode(t, body)
	_, err = alice.Logical().Write(e.path("users/"+aliceID), map[string]any{"code": redirect.Query().Get("code"), "state": state})
	wantStatus(t, err, http.StatusBadRequest, "already used")
	_, err = alice.Logical().Write(e.path("users/"+aliceID), map[string]any{"confirmation_code": "AAAA-AAAA", "state": state})
	wantStatus(t, err, http.StatusBadRequest, "wrong confirmation code")

	// A, handed B's redirect before B's browser reached the callback, relays its code herself.
	state, authorizeURL = link(alice, aliceID)
	redirect, _ = bobBrowser.Authorize(t.Context(), authorizeURL+"&approval_prompt=auto", bobAccount, false)
	if redirect == nil || !redirect.Query().Has("code") {
		t.Fatal("ev.energy showed B a consent page for approval_prompt=auto")
	}
	_, err = alice.Logical().Write(e.path("users/"+aliceID), map[string]any{"code": redirect.Query().Get("code"), "state": state})
	if account := readAccount(alice, aliceID); account != "" {
		t.Fatalf("A reads a token of account %q after relaying B's code (%v)", account, err)
	}
	wantStatus(t, err, http.StatusBadRequest, "confirmation_code")

	// Control: A's own link, opened by A, connects A once she writes back the code her page shows.
	alicesCode := confirm(alice, aliceID, standin.NewBrowser(), aliceAccount)
	if account := readAccount(alice, aliceID); account != aliceAccount {
		t.Fatalf("A's token is of account %q, want %s", account, aliceAccount)
	}
	if account := readAccount(bob, bobID); account != bobAccount {
		t.Fatalf("B's token is now of account %q", account)
	}
	logged, err := os.ReadFile(devVault.log)
	if err != nil {
		t.Fatal(err)
	}
	for _, code := range []string{bobsCode, bobsHeldCode, alicesCode, confirmationCode(bobsCode), confirmationCode(bobsHeldCode), confirmationCode(alicesCode)} {
		if strings.Contains(string(logged), code) {
			t.Error("a confirmation code is in Vault's log")
		}
	}

	// Links root and a trusted application make for a user connect in one visit, as before.
	appPolicy := fmt.Sprintf("path %q { capabilities = [\"update\"] }\npath %q { capabilities = [\"read\"] }\n", e.path("auth-url/*"), e.path("users/+/token"))
	app := e.trustedApplication(t, appPolicy)
	for _, maker := range []struct {
		client     *api.Client
		user       string
		completion string
	}{{e.vault, "carol", completionCallback}, {app, "dave", completionCallback}} {
		s, err := maker.client.Logical().Write(e.path("auth-url/"+maker.user), map[string]any{"redirect_uri": e.callbackURL()})
		if err != nil {
			t.Fatalf("auth-url for %s: %v", maker.user, err)
		}
		if s.Data["completion"] != maker.completion {
			t.Errorf("auth-url for %s says the link completes by %v, want %s", maker.user, s.Data["completion"], maker.completion)
		}
		account := maker.user + "@example.com"
		redirect, err := standin.NewBrowser().Authorize(t.Context(), s.Data["authorize_url"].(string), account, true)
		if err != nil {
			t.Fatal(err)
		}
		if status, body := page(t, redirect.String()); status != http.StatusOK || !strings.Contains(body, ">Connected<") {
			t.Fatalf("the link for %s: callback page %d", maker.user, status)
		}
		tok, err := maker.client.Logical().Read(e.path("users/" + maker.user + "/token"))
		if err != nil {
			t.Fatal(err)
		}
		if info, _ := e.standin.Token(e.standinToken(t, tok)); info.User != account {
			t.Fatalf("%s's token is of account %q", maker.user, info.User)
		}
	}
}

// trustedApplication logs in a Vault entity of this test under policy, as an application that
// makes links for its users with its own token: a userpass login beside those of userpass.
func (e *accEnv) trustedApplication(t *testing.T, policy string) *api.Client {
	t.Helper()
	auth := "userpass-" + strings.TrimPrefix(e.mount, "evenergy-")
	if err := e.vault.Sys().PutPolicy(e.mount+"-app", policy); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vault.Logical().Write("auth/"+auth+"/users/app", map[string]any{"password": "pw-app", "token_policies": e.mount + "-app"}); err != nil {
		t.Fatal(err)
	}
	c, err := e.vault.Clone()
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Logical().Write("auth/"+auth+"/login/app", map[string]any{"password": "pw-app"})
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(s.Auth.ClientToken)
	return c
}

// unitCallback is the callback of the mount evenergy/, on which requestAs runs requests.
const unitCallback = "https://vault.example.com/v1/evenergy/callback"

// requestAs runs one request against a unit backend mounted at evenergy/, as the Vault entity
// entityID ("" for a token without one, such as root).
func requestAs(t testing.TB, b *backend, s logical.Storage, entityID string, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	t.Helper()
	return b.HandleRequest(context.Background(), &logical.Request{Operation: op, Path: path, Storage: s, Data: data, EntityID: entityID, MountPoint: "evenergy/"})
}

// heldAtCallback has entity make a link for itself to the callback and account open it at the
// stand-in, whose redirect goes to the callback; it returns the state, that redirect and the page.
func heldAtCallback(t *testing.T, b *backend, s logical.Storage, sv *standin.Server, entity, account string) (state, redirect, page string) {
	t.Helper()
	resp, err := requestAs(t, b, s, entity, logical.UpdateOperation, "auth-url/"+entity, map[string]any{"redirect_uri": unitCallback})
	if err != nil || resp.IsError() {
		t.Fatalf("auth-url: %v %v", err, resp)
	}
	if resp.Data["completion"] != completionConfirmationCode {
		t.Errorf("auth-url says the link completes by %v, want %s", resp.Data["completion"], completionConfirmationCode)
	}
	back, err := sv.Authorize(t.Context(), resp.Data["authorize_url"].(string), account, true)
	if err != nil {
		t.Fatal(err)
	}
	callback, err := request(t, b, s, logical.ReadOperation, "callback", map[string]any{"state": back.Query().Get("state"), "code": back.Query().Get("code")})
	if err != nil || callback.Data[logical.HTTPStatusCode] != http.StatusOK {
		t.Fatalf("callback: %v %v", err, callback)
	}
	return resp.Data["state"].(string), back.String(), string(callback.Data[logical.HTTPRawBody].([]byte))
}

// wantCoded checks that err is a coded error of this HTTP status saying want.
func wantCoded(t *testing.T, resp *logical.Response, err error, status int, want string) {
	t.Helper()
	var coded logical.HTTPCodedError
	msg := fmt.Sprint(err)
	if resp.IsError() {
		msg = resp.Error().Error()
	}
	if !errors.As(err, &coded) && !(status == http.StatusBadRequest && errors.Is(err, logical.ErrInvalidRequest)) {
		t.Fatalf("want HTTP %d saying %q, got %v %v", status, want, resp, err)
	}
	if coded != nil && coded.Code() != status || !strings.Contains(msg, want) {
		t.Fatalf("want HTTP %d saying %q, got %q", status, want, msg)
	}
}

// heldTokens are the stand-in's tokens of account, which must be live while held.
func heldTokens(t *testing.T, sv *standin.Server, account string) []string {
	t.Helper()
	var values []string
	for _, info := range sv.Tokens() {
		if info.User == account {
			if !sv.Active(info.Value) {
				t.Fatalf("a held %s token is not live", info.Kind)
			}
			values = append(values, info.Value)
		}
	}
	if len(values) != 2 {
		t.Fatalf("the stand-in issued %d tokens to %s, want an access and a refresh token", len(values), account)
	}
	return values
}

func TestSelfMadeLinkIsHeldForItsMakerOnly(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	state, redirect, page := heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	for _, want := range []string{`<h1 id="result">Not connected yet</h1>`, "enter this code in <span class=\"app\">" + testClientID + "</span> yourself", "Never give this code to anyone"} {
		if !strings.Contains(page, want) {
			t.Errorf("the callback page does not say %q; it reads:\n%s", want, page)
		}
	}
	for _, v := range callbackURLValues(t, redirect) {
		if strings.Contains(page, v) {
			t.Error("the callback page carries the code or state of its URL")
		}
	}
	code := pageConfirmationCode(t, page)
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a"); g != nil {
		t.Fatal("the callback stored a grant for a self-made link")
	}
	tokens := heldTokens(t, sv, "bob@example.com")

	claim := map[string]any{"state": state, "confirmation_code": code}
	for range confirmationAttempts { // none of these counts against the maker
		resp, err := requestAs(t, b, s, "entity-b", logical.UpdateOperation, "users/entity-a", claim)
		wantCoded(t, resp, err, http.StatusForbidden, "only the Vault identity that made this link")
		resp, err = requestAs(t, b, s, "", logical.UpdateOperation, "users/entity-a", claim)
		wantCoded(t, resp, err, http.StatusForbidden, "only the Vault identity that made this link")
	}
	resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-b", claim)
	wantCoded(t, resp, err, http.StatusBadRequest, "waits for a confirmation code")

	typed := " " + strings.ToLower(strings.ReplaceAll(code, "-", " ")) + " " // as a person may type it
	if resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"state": state, "confirmation_code": typed}); err != nil || resp.IsError() {
		t.Fatalf("the maker's confirmation: %v %v", err, resp)
	}
	g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a")
	if g == nil || g.AccessToken != tokens[0] || g.RefreshToken != tokens[1] || g.ClientID != testClientID || g.Scope != strings.Join(testScopes, " ") || g.Status != grantActive {
		t.Fatal("the confirmed grant is not the held one, of the configured client, scopes and status active")
	}
	resp, err = requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", claim)
	wantCoded(t, resp, err, http.StatusBadRequest, "already confirmed")
	if keys, _ := s.List(t.Context(), unconfirmedGrantPrefix); len(keys) != 0 {
		t.Fatalf("%d unconfirmed grants left after the confirmation", len(keys))
	}
}

func TestWrongConfirmationCodesRevokeTheHeldTokens(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	state, _, page := heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	code := pageConfirmationCode(t, page)
	tokens := heldTokens(t, sv, "bob@example.com")

	wrong := map[string]any{"state": state, "confirmation_code": "AAAA-AAAA"}
	for left := confirmationAttempts - 1; left > 0; left-- {
		resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", wrong)
		wantCoded(t, resp, err, http.StatusBadRequest, fmt.Sprintf("wrong confirmation code: %d attempts left", left))
	}
	resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", wrong)
	wantCoded(t, resp, err, http.StatusBadRequest, "no attempts left")
	for _, tok := range tokens {
		if sv.Active(tok) {
			t.Fatal("a held token is live after the last wrong code")
		}
	}
	resp, err = requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"state": state, "confirmation_code": code})
	wantCoded(t, resp, err, http.StatusBadRequest, "waits for a confirmation code")
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a"); g != nil || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("after the revocation: a grant stored %v, %d records queued", g != nil, len(pendingRevocations(t, s)))
	}
}

// TestConfirmationCodeAloneFindsTheHeldGrant: the maker writes the code alone, as a person types
// it; it is matched among the user's held grants, and wrong codes count per user, whichever link
// they were meant for, a newer link included.
func TestConfirmationCodeAloneFindsTheHeldGrant(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	_, _, first := heldAtCallback(t, b, s, sv, "entity-a", "first@example.com")
	_, _, second := heldAtCallback(t, b, s, sv, "entity-a", "second@example.com")
	firstTokens, secondTokens := heldTokens(t, sv, "first@example.com"), heldTokens(t, sv, "second@example.com")
	confirm := func(entity, code string) (*logical.Response, error) {
		return requestAs(t, b, s, entity, logical.UpdateOperation, "users/"+entity, map[string]any{"confirmation_code": code})
	}
	if resp, err := confirm("entity-a", strings.ToLower(pageConfirmationCode(t, second))); err != nil || resp.IsError() {
		t.Fatalf("the code alone: %v %v", err, resp)
	}
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a"); g == nil || g.AccessToken != secondTokens[0] {
		t.Fatal("the code alone did not connect the grant it was shown for")
	}
	resp, err := confirm("entity-b", pageConfirmationCode(t, first))
	wantCoded(t, resp, err, http.StatusBadRequest, "waits for a confirmation code")

	for left := confirmationAttempts - 1; left > 0; left-- { // a newer link starts with the attempts counted
		if left == confirmationAttempts-2 {
			heldAtCallback(t, b, s, sv, "entity-a", "third@example.com")
		}
		resp, err := confirm("entity-a", "AAAA-AAAA")
		wantCoded(t, resp, err, http.StatusBadRequest, fmt.Sprintf("wrong confirmation code: %d attempts left", left))
	}
	resp, err = confirm("entity-a", "AAAA-AAAA")
	wantCoded(t, resp, err, http.StatusBadRequest, "no attempts left")
	for _, tok := range append(firstTokens, heldTokensAnyState(sv, "third@example.com")...) {
		if sv.Active(tok) {
			t.Fatal("a token held for the user is live after the user's last wrong code")
		}
	}
	resp, err = confirm("entity-a", pageConfirmationCode(t, first))
	wantCoded(t, resp, err, http.StatusBadRequest, "waits for a confirmation code")
}

// heldTokensAnyState are the stand-in's tokens of account, live or not.
func heldTokensAnyState(sv *standin.Server, account string) []string {
	var values []string
	for _, info := range sv.Tokens() {
		if info.User == account {
			values = append(values, info.Value)
		}
	}
	return values
}

func TestUnclaimedGrantIsRevokedOnceItExpires(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	clock := useFakeClock(b, time.Now())
	state, _, page := heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	tokens := heldTokens(t, sv, "bob@example.com")

	clock.Advance(authRequestTTL - time.Second)
	runPeriodic(t, b, s)
	heldTokens(t, sv, "bob@example.com")
	clock.Advance(2 * time.Second)
	runPeriodic(t, b, failingStorage{Storage: s, prefix: revocationPrefix}) // revoked directly: nothing queued
	for _, tok := range tokens {
		if sv.Active(tok) {
			t.Fatal("an unclaimed token is live after its grant expired")
		}
	}
	if keys, _ := s.List(t.Context(), unconfirmedGrantPrefix); len(keys) != 0 || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("%d unconfirmed grants and %d revocations left", len(keys), len(pendingRevocations(t, s)))
	}
	resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"state": state, "confirmation_code": pageConfirmationCode(t, page)})
	wantCoded(t, resp, err, http.StatusBadRequest, "waits for a confirmation code")
}

func TestPeriodicPassBoundsUnclaimedGrants(t *testing.T) {
	t.Parallel()
	b, s := newUnitBackend(t)
	newUnitStandin(t, b, s)
	const extra = 5
	for i := range unconfirmedPerPass + extra {
		held := unconfirmedGrant{User: "u", MadeBy: "u", ExpiresAt: time.Now().Add(-time.Second), ClientID: testClientID, AccessToken: fmt.Sprintf("a%d", i)}
		if err := putJSON(t.Context(), s, unconfirmedGrantPrefix+fmt.Sprintf("S%025d", i), held); err != nil {
			t.Fatal(err)
		}
	}
	runPeriodic(t, b, s)
	if keys, _ := s.List(t.Context(), unconfirmedGrantPrefix); len(keys) != extra {
		t.Fatalf("one pass left %d expired unconfirmed grants, want %d", len(keys), extra)
	}
	runPeriodic(t, b, s)
	if keys, _ := s.List(t.Context(), unconfirmedGrantPrefix); len(keys) != 0 {
		t.Fatalf("the next pass left %d expired unconfirmed grants", len(keys))
	}
}

func TestConfirmationCodesAndHeldTokensStayOutOfLogsAndErrors(t *testing.T) {
	var logs lockedBuffer
	config := logical.TestBackendConfig()
	config.StorageView = &logical.InmemStorage{}
	config.Logger = hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Trace})
	engine, err := Factory(t.Context(), config)
	if err != nil {
		t.Fatal(err)
	}
	b, s := engine.(*backend), config.StorageView
	sw := &switchableStandin{Server: newTestStandin()}
	unitConfig(t, b, s, sw)
	clock := useFakeClock(b, time.Now())

	var answers []string // every error and response but the callback pages
	write := func(entity, user string, data map[string]any) {
		resp, err := requestAs(t, b, s, entity, logical.UpdateOperation, "users/"+user, data)
		body, _ := json.Marshal(resp)
		answers = append(answers, fmt.Sprint(err), string(body))
	}
	var secrets []string
	hold := func(account string) (state, code string) {
		state, _, page := heldAtCallback(t, b, s, sw.Server, "entity-a", account)
		code = pageConfirmationCode(t, page)
		secrets = append(append(secrets, code, confirmationCode(code)), heldTokens(t, sw.Server, account)...)
		return state, code
	}
	exhausted, exhaustedCode := hold("exhausted@example.com")
	confirmed, confirmedCode := hold("confirmed@example.com")
	hold("unclaimed@example.com")
	sw.down.Store(true) // failed revocations log, and answer, the most

	write("entity-b", "entity-a", map[string]any{"state": exhausted, "confirmation_code": exhaustedCode})
	for range confirmationAttempts {
		write("entity-a", "entity-a", map[string]any{"state": exhausted, "confirmation_code": "AAAA-AAAA"})
	}
	write("entity-a", "entity-a", map[string]any{"state": exhausted, "confirmation_code": exhaustedCode})
	write("entity-a", "entity-a", map[string]any{"state": confirmed, "confirmation_code": confirmedCode, "code": "x"})
	write("entity-a", "entity-a", map[string]any{"state": confirmed, "confirmation_code": confirmedCode})
	clock.Advance(authRequestTTL + time.Second)
	_ = b.periodic(t.Context(), &logical.Request{Storage: s})
	if len(pendingRevocations(t, s)) != 3 { // the last wrong code revokes every grant held for the user
		t.Fatalf("want the three held grants queued, got %d records", len(pendingRevocations(t, s)))
	}

	logged := logs.buf.String()
	if !strings.Contains(logged, "too many wrong confirmation codes") {
		t.Fatalf("the log capture missed the engine's warnings:\n%s", logged)
	}
	for i, secret := range secrets {
		if strings.Contains(logged, secret) {
			t.Errorf("secret %d of the held connections is in the log", i)
		}
		for _, answer := range answers {
			if strings.Contains(answer, secret) {
				t.Errorf("secret %d of the held connections is in an answer", i)
			}
		}
	}
}

func TestUnconfirmedGrantOfARetiredClientIsRevokedAsThatClient(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	state, _, page := heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	tokens := heldTokens(t, sv, "bob@example.com")
	switchClient(t, b, s, sv)
	if err := b.forgetSpentClients(t.Context(), s, time.Now().Add(tokenLifetime+time.Minute)); err != nil {
		t.Fatal(err)
	}
	if keys, _ := s.List(t.Context(), retiredClientPrefix); len(keys) != 1 {
		t.Fatal("the retired client was forgotten while a grant held at the callback is of it")
	}
	resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"state": state, "confirmation_code": pageConfirmationCode(t, page)})
	wantCoded(t, resp, err, http.StatusBadRequest, "made for ev.energy client "+testClientID+", not for the configured client "+otherClientID)
	for _, tok := range tokens {
		if sv.Active(tok) {
			t.Fatal("a held token of the retired client is live after its confirmation was refused")
		}
	}
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a"); g != nil {
		t.Fatal("a grant of the retired client was stored as the configured client's")
	}
}

// TestConfirmationAttemptStorageCannotCountIsRefused: an attempt is counted before its code is
// checked, so while storage refuses to count it, even the right code connects nothing.
func TestConfirmationAttemptStorageCannotCountIsRefused(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	state, _, page := heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	right := map[string]any{"state": state, "confirmation_code": pageConfirmationCode(t, page)}
	failing := failingStorage{Storage: s, prefix: unconfirmedGrantPrefix}
	for _, claim := range []map[string]any{{"state": state, "confirmation_code": "AAAA-AAAA"}, right} {
		resp, err := b.HandleRequest(t.Context(), &logical.Request{Operation: logical.UpdateOperation, Path: "users/entity-a", Storage: failing, Data: claim, EntityID: "entity-a", MountPoint: "evenergy/"})
		if err == nil || !strings.Contains(err.Error(), "storage unavailable") {
			t.Fatalf("an attempt storage could not count answered %v %v, want the storage error", resp, err)
		}
	}
	if g, _ := getJSON[grant](t.Context(), s, userPrefix+"entity-a"); g != nil {
		t.Fatal("an attempt storage could not count connected the held grant")
	}
	resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"state": state, "confirmation_code": "AAAA-AAAA"})
	wantCoded(t, resp, err, http.StatusBadRequest, fmt.Sprintf("wrong confirmation code: %d attempts left", confirmationAttempts-1))
	if resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", right); err != nil || resp.IsError() {
		t.Fatalf("the right code once storage counts again: %v %v", err, resp)
	}
}

// holdingStorage blocks every write of an unconfirmed grant until release is closed, as a slow
// storage backend or ev.energy's slow token endpoint keeps a callback between consuming its link
// and holding its tokens.
type holdingStorage struct {
	logical.Storage
	release chan struct{}
}

func (h holdingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if strings.HasPrefix(e.Key, unconfirmedGrantPrefix) {
		<-h.release
	}
	return h.Storage.Put(ctx, e)
}

// TestCallbacksInFlightKeepTheHeldBound: a maker who opens her links at the callback faster than
// they are held, and makes new links meanwhile, keeps no more than the per-user bound held: a link
// being exchanged is neither pending nor held, so auth-url alone cannot see it.
func TestCallbacksInFlightKeepTheHeldBound(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	slow := holdingStorage{Storage: s, release: make(chan struct{})}
	folder := authRequestPrefix + pendingTag("entity-a") + "/"
	const rounds = 3
	done := make(chan error, rounds*maxPendingPerUser)
	for round := range rounds {
		for i := range maxPendingPerUser {
			resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "auth-url/entity-a", map[string]any{"redirect_uri": unitCallback})
			if err != nil || resp.IsError() {
				t.Fatalf("auth-url: %v %v", err, resp)
			}
			back, err := sv.Authorize(t.Context(), resp.Data["authorize_url"].(string), fmt.Sprintf("r%d-%d@example.com", round, i), true)
			if err != nil {
				t.Fatal(err)
			}
			go func() {
				callback, err := request(t, b, slow, logical.ReadOperation, "callback", map[string]any{"state": back.Query().Get("state"), "code": back.Query().Get("code")})
				if err == nil && callback.Data[logical.HTTPStatusCode] != http.StatusOK {
					err = fmt.Errorf("callback answered %v", callback.Data[logical.HTTPStatusCode])
				}
				done <- err
			}()
		}
		eventually(t, time.Minute, "the round's links consumed at the callback", func() bool {
			names, err := s.List(t.Context(), folder)
			return err == nil && len(names) == 0
		})
	}
	close(slow.release)
	for range rounds * maxPendingPerUser {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	held, err := b.heldFor(t.Context(), s, "entity-a")
	if err != nil {
		t.Fatal(err)
	}
	live := 0
	for _, info := range sv.Tokens() {
		if info.Kind == "refresh" && sv.Active(info.Value) {
			live++
		}
	}
	if len(held) > maxPendingPerUser || live > maxPendingPerUser {
		t.Fatalf("one maker holds %d grants (%d live refresh tokens at ev.energy), want at most %d", len(held), live, maxPendingPerUser)
	}
}

// TestLastWrongCodeWithEvenergyDownQueuesTheHeldTokens: when ev.energy does not answer the
// revocation of the last wrong code, the held tokens are queued (not left held, nor lost), and the
// pass revokes them once ev.energy answers again.
func TestLastWrongCodeWithEvenergyDownQueuesTheHeldTokens(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	heldAtCallback(t, b, s, sv, "entity-a", "bob@example.com")
	tokens := heldTokens(t, sv, "bob@example.com")
	cfg, err := getConfig(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	dead, err := freeLoopbackAddr()
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"base_url": "http://" + dead}); err != nil || resp.IsError() {
		t.Fatalf("config: %v %v", err, resp)
	}
	for range confirmationAttempts - 1 {
		requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"confirmation_code": "AAAA-AAAA"})
	}
	resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "users/entity-a", map[string]any{"confirmation_code": "AAAA-AAAA"})
	wantCoded(t, resp, err, http.StatusBadRequest, "no attempts left")
	if keys, _ := s.List(t.Context(), unconfirmedGrantPrefix); len(keys) != 0 {
		t.Fatalf("%d grants still held after the last wrong code", len(keys))
	}
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].AccessToken != tokens[0] || queued[0].RefreshToken != tokens[1] || queued[0].Reason != reasonUnconfirmed {
		t.Fatalf("queued %d records, want the held access and refresh token", len(queued))
	}
	if resp, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"base_url": cfg.BaseURL}); err != nil || resp.IsError() {
		t.Fatalf("config: %v %v", err, resp)
	}
	eventually(t, time.Minute, "the queued held tokens revoked", func() bool {
		runPeriodicTolerant(b, s)
		return !sv.Active(tokens[0]) && !sv.Active(tokens[1]) && len(pendingRevocations(t, s)) == 0
	})
}
