package evenergy

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestAuthURLStartsPKCEFlow(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app", "client_secret": "s3cret", "scopes": "vehicle:read"}); err != nil {
		t.Fatal(err)
	}
	resp, err := request(t, b, s, logical.UpdateOperation, "auth-url/driver-1", map[string]any{"redirect_uri": "https://app.example.com/cb"})
	if err != nil || resp.IsError() {
		t.Fatalf("auth-url: %v %v", err, resp)
	}
	state := resp.Data["state"].(string)
	key, _ := pendingKey(state)
	pending, err := getJSON[authRequest](t.Context(), s, key)
	if err != nil || pending == nil {
		t.Fatalf("pending authorization not stored: %v", err)
	}

	if !regexp.MustCompile(`^[A-Za-z0-9._~-]{43,128}$`).MatchString(pending.Verifier) {
		t.Fatalf("verifier is not RFC 7636: %d characters", len(pending.Verifier))
	}
	body, _ := json.Marshal(resp.Data)
	if strings.Contains(string(body), pending.Verifier) {
		t.Fatal("the response carries the PKCE verifier")
	}

	u, err := url.Parse(resp.Data["authorize_url"].(string))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(pending.Verifier))
	q := u.Query()
	want := map[string]string{
		"response_type": "code", "client_id": "app", "redirect_uri": "https://app.example.com/cb", "scope": "vehicle:read",
		"state": state, "code_challenge": base64.RawURLEncoding.EncodeToString(sum[:]), "code_challenge_method": "S256",
	}
	for k, v := range want {
		if q.Get(k) != v {
			t.Errorf("authorize_url %s = %q, want %q", k, q.Get(k), v)
		}
	}
	if u.Scheme+"://"+u.Host+u.Path != defaultBaseURL+"/o/authorize/" || q.Has("client_secret") {
		t.Errorf("authorize_url goes to %s://%s%s or carries the secret", u.Scheme, u.Host, u.Path)
	}
	expiresAt, _ := time.Parse(time.RFC3339, resp.Data["expires_at"].(string))
	if d := time.Until(expiresAt); d < 9*time.Minute || d > 10*time.Minute {
		t.Errorf("pending authorization lives %v, want 10 minutes", d)
	}
}

func TestAuthURLRejectsBadInput(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app"}); err != nil {
		t.Fatal(err)
	}
	cases := map[string]struct {
		data map[string]any
		want string
	}{
		"no redirect_uri": {map[string]any{}, "redirect_uri must be an absolute URL"},
		"plain http":      {map[string]any{"redirect_uri": "http://a.example/cb"}, "redirect_uri must use https://"},
		"user info":       {map[string]any{"redirect_uri": "https://me:pw@a.example/cb"}, "redirect_uri must not carry user info"},
	}
	for name, tc := range cases {
		resp, err := request(t, b, s, logical.UpdateOperation, "auth-url/a", tc.data)
		if err != nil || !resp.IsError() || !strings.Contains(resp.Error().Error(), tc.want) {
			t.Errorf("%s: want a 400 saying %q, got %v %v", name, tc.want, resp, err)
		}
	}
	if keys, _ := s.List(t.Context(), authRequestPrefix); len(keys) != 0 {
		t.Fatalf("rejected requests stored %d pending authorizations", len(keys))
	}
}

func TestPeriodicForgetsExpiredAuthorizations(t *testing.T) {
	b, s := newUnitBackend(t)
	folder := authRequestPrefix + pendingTag("u") + "/"
	fresh := time.Now().Add(time.Minute)
	for _, expiresAt := range []time.Time{time.Now().Add(-time.Second), fresh} {
		if err := putJSON(t.Context(), s, folder+strconv.FormatInt(expiresAt.UnixNano(), 10)+"-"+strings.Repeat("A", 26), authRequest{User: "u", ExpiresAt: expiresAt}); err != nil {
			t.Fatal(err)
		}
	}
	// As earlier versions stored them.
	for state, expiresAt := range map[string]time.Time{"old": time.Now().Add(-time.Second), "fresh": time.Now().Add(time.Minute)} {
		if err := putJSON(t.Context(), s, authRequestPrefix+state, authRequest{User: "u", ExpiresAt: expiresAt}); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	if keys, _ := s.List(t.Context(), authRequestPrefix); strings.Join(keys, ",") != pendingTag("u")+"/,fresh" {
		t.Fatalf("pending authorizations left: %v", keys)
	}
	if names, _ := s.List(t.Context(), folder); len(names) != 1 || !strings.HasPrefix(names[0], strconv.FormatInt(fresh.UnixNano(), 10)) {
		t.Fatalf("pending authorizations of the user left: %v", names)
	}
}

// newLink writes auth-url for user on a unit backend, with the application's redirect.
func newLink(t testing.TB, b *backend, s logical.Storage, user string) *logical.Response {
	t.Helper()
	resp, err := request(t, b, s, logical.UpdateOperation, "auth-url/"+user, map[string]any{"redirect_uri": appRedirect})
	if err != nil || resp.IsError() {
		t.Fatalf("auth-url: %v %v", err, resp)
	}
	return resp
}

// storedPending counts the pending authorizations in storage, in either layout.
func storedPending(t testing.TB, s logical.Storage) int {
	t.Helper()
	keys, err := s.List(context.Background(), authRequestPrefix)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, key := range keys {
		if !strings.HasSuffix(key, "/") {
			n++
			continue
		}
		names, err := s.List(context.Background(), authRequestPrefix+key)
		if err != nil {
			t.Fatal(err)
		}
		n += len(names)
	}
	return n
}

func TestAuthURLKeepsFewPendingLinksPerUser(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	var links []*logical.Response
	for i := range maxPendingPerUser + 2 {
		resp := newLink(t, b, s, "driver-1")
		replaced := len(resp.Warnings) == 1 && strings.Contains(resp.Warnings[0], "user driver-1 had 5 pending authorization links, the most kept per user with connections waiting for a confirmation code: this link replaced the oldest 1, which no longer work")
		if want := i >= maxPendingPerUser; replaced != want || len(resp.Warnings) > 1 {
			t.Errorf("link %d: warnings %q, want the oldest replaced: %v", i+1, resp.Warnings, want)
		}
		links = append(links, resp)
	}
	// Another user's links are counted apart.
	if resp := newLink(t, b, s, "driver-2"); len(resp.Warnings) != 0 {
		t.Fatalf("another user's link warned: %q", resp.Warnings)
	}
	if n := storedPending(t, s); n != maxPendingPerUser+1 {
		t.Fatalf("%d pending authorizations stored, want %d of driver-1 and 1 of driver-2", n, maxPendingPerUser)
	}

	// A replaced link fails even though ev.energy gave its code; the newest completes.
	complete := func(link *logical.Response) (*logical.Response, error) {
		redirect, err := sv.Authorize(t.Context(), link.Data["authorize_url"].(string), "driver-1", true)
		if err != nil {
			t.Fatal(err)
		}
		return request(t, b, s, logical.UpdateOperation, "users/driver-1", map[string]any{"code": redirect.Query().Get("code"), "state": link.Data["state"]})
	}
	for _, replaced := range links[:2] {
		if resp, err := complete(replaced); err == nil && !resp.IsError() {
			t.Fatal("a replaced link completed")
		} else if !strings.Contains(fmt.Sprint(resp, err), "replaced by a newer link") {
			t.Errorf("a replaced link answered %v %v, want it to say links get replaced", resp, err)
		}
	}
	if resp, err := complete(links[len(links)-1]); err != nil || resp.IsError() {
		t.Fatalf("the newest link: %v %v", err, resp)
	}
}

func TestAuthURLRecordsItsMakerAndSaysHowTheLinkCompletes(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app", "callback_url": unitCallback}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		entity, user, redirectURI, completion string
	}{
		{"entity-a", "entity-a", unitCallback, completionConfirmationCode},
		{"entity-a", "entity-a", "HTTPS://Vault.Example.COM/v1/evenergy/callback", completionConfirmationCode},
		{"", "driver-1", unitCallback, completionCallback}, // a token without an entity, such as root
		{"", "driver-1", appRedirect, completionApplication},
		{"app-entity", "driver-1", unitCallback, completionCallback}, // an application, for its user
		{"app-entity", "driver-1", appRedirect, completionApplication},
	} {
		resp, err := requestAs(t, b, s, tc.entity, logical.UpdateOperation, "auth-url/"+tc.user, map[string]any{"redirect_uri": tc.redirectURI})
		if err != nil || resp.IsError() {
			t.Fatalf("auth-url: %v %v", err, resp)
		}
		if resp.Data["completion"] != tc.completion {
			t.Errorf("entity %q, user %s, redirect %s: completion %v, want %s", tc.entity, tc.user, tc.redirectURI, resp.Data["completion"], tc.completion)
		}
		key, _ := pendingKey(resp.Data["state"].(string))
		pending, err := getJSON[authRequest](t.Context(), s, key)
		if err != nil || pending == nil {
			t.Fatalf("pending authorization not stored: %v", err)
		}
		if pending.MadeBy != tc.entity {
			t.Errorf("entity %q: the pending authorization records its maker as %q", tc.entity, pending.MadeBy)
		}
	}
}

// TestAuthURLRefusesSelfMadeLinksElsewhere: a link an entity makes for itself goes to this mount's
// callback, recognised by its whole URL, or is not made; without callback_url in the config, none is.
func TestAuthURLRefusesSelfMadeLinksElsewhere(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app"}); err != nil {
		t.Fatal(err)
	}
	selfMade := func(redirectURI string) (*logical.Response, error) {
		return requestAs(t, b, s, "entity-a", logical.UpdateOperation, "auth-url/entity-a", map[string]any{"redirect_uri": redirectURI})
	}
	resp, err := selfMade(unitCallback)
	wantCoded(t, resp, err, http.StatusBadRequest, "an operator writes callback_url=https://VAULT/v1/evenergy/callback")
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"callback_url": unitCallback}); err != nil {
		t.Fatal(err)
	}
	for _, elsewhere := range []string{
		appRedirect,
		"https://app.example.com/v1/evenergy/callback",         // the callback's path on another host
		"https://vault.example.com/v1/other/evenergy/callback", // a path ending as the callback's does
		"https://vault.example.com:8200/v1/evenergy/callback",
	} {
		resp, err := selfMade(elsewhere)
		wantCoded(t, resp, err, http.StatusBadRequest, "have a trusted application make the link with its own Vault token")
	}
	if n := storedPending(t, s); n != 0 {
		t.Fatalf("%d refused links stored", n)
	}
	for _, bad := range []string{"https://vault.example.com/v1/other/callback", "https://vault.example.com/v1/evenergy/callback?x=1", "http://vault.example.com/v1/evenergy/callback"} {
		if resp, err := requestAs(t, b, s, "", logical.UpdateOperation, "config", map[string]any{"callback_url": bad}); err != nil || !resp.IsError() || !strings.Contains(resp.Error().Error(), "callback_url must") {
			t.Errorf("config callback_url=%s: %v %v, want it refused", bad, resp, err)
		}
	}
}

// TestSelfMadeLinksHeldCountWithPendingOnes: held grants count with pending links in one bound per
// user; a newer link replaces the oldest, and a replaced held grant's tokens are revoked.
func TestSelfMadeLinksHeldCountWithPendingOnes(t *testing.T) {
	t.Parallel()
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	const links = 50
	for i := range links {
		heldAtCallback(t, b, s, sv, "entity-a", fmt.Sprintf("driver-%d@example.com", i))
		held, err := b.heldFor(t.Context(), s, "entity-a")
		if err != nil {
			t.Fatal(err)
		}
		if stored, _ := s.List(t.Context(), unconfirmedGrantPrefix); len(held) > maxPendingPerUser || len(stored) != len(held) || len(held)+storedPending(t, s) > maxPendingPerUser {
			t.Fatalf("after %d links: %d held in memory, %d stored, %d pending; at most %d together", i+1, len(held), len(stored), storedPending(t, s), maxPendingPerUser)
		}
	}
	live := 0
	for _, info := range sv.Tokens() {
		if sv.Active(info.Value) {
			live++
		}
	}
	if live > 2*maxPendingPerUser {
		t.Fatalf("%d tokens of %d links are live at ev.energy, want those of the %d held at most", live, links, maxPendingPerUser)
	}
}

// TestAuthURLRefusesSelfMadeLinksToLookalikes: an attacker's redirect_uri that a browser could take
// somewhere other than the configured callback, or that an application may serve, is refused in every
// written form; only case in scheme and host, which no browser tells apart, is allowed.
func TestAuthURLRefusesSelfMadeLinksToLookalikes(t *testing.T) {
	b, s := newUnitBackend(t)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": "app", "callback_url": unitCallback}); err != nil {
		t.Fatal(err)
	}
	for _, lookalike := range []string{
		"https://vault.example.com/v1/evenergy/callback/",
		"https://vault.example.com/v1/evenergy/Callback",
		"https://vault.example.com/v1/evenergy/callback?next=https://app.example.com",
		"https://vault.example.com/v1/evenergy/callback#x",
		"https://vault.example.com/v1/evenergy/%63allback",
		"https://vault.example.com/v1/evenergy%2Fcallback",
		"https://vault.example.com/v1/app/../evenergy/callback",
		"https://vault.example.com/v1/evenergy/callback/../../app/cb",
		"https://user@vault.example.com/v1/evenergy/callback",
		"https://vault.example.com@app.example.com/v1/evenergy/callback",
		"https://vault.example.com:443/v1/evenergy/callback",
		"https://vault.example.com./v1/evenergy/callback",
		"http://vault.example.com/v1/evenergy/callback",
		"https://vault.example.com/v1/ns1/evenergy/callback",
		"https://vault.example.com/v1//evenergy/callback",
	} {
		resp, err := requestAs(t, b, s, "entity-a", logical.UpdateOperation, "auth-url/entity-a", map[string]any{"redirect_uri": lookalike})
		var coded logical.HTTPCodedError
		if !(err != nil && errors.As(err, &coded) && coded.Code() == http.StatusBadRequest) && !(err == nil && resp.IsError()) && !errors.Is(err, logical.ErrInvalidRequest) {
			t.Errorf("self-made link to %s: %v %v, want 400", lookalike, resp, err)
		}
	}
	if n := storedPending(t, s); n != 0 {
		t.Fatalf("%d lookalike links stored", n)
	}
}
