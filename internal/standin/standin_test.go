package standin

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	scopes   = "charging_session:read vehicle:read"
	callback = "https://vault.example/v1/evenergy/callback"
	mobileCB = "com.example.app:/callback"
	verifier = "dBjftJeZ4CVP-mJ92K9f6MUnDDbL8x-5Dn69tEURGB8"
	// challenge is the S256 code challenge of verifier, computed with Python's hashlib and base64.
	challenge = "pNzBllRSGziDpknqObIcSs9BMX0OJqEuseQKbppHync"
)

var tokenValue = regexp.MustCompile(`^[A-Za-z0-9]{30}$`)

// newStandin serves a stand-in with a confidential client "vault", a second confidential client
// "other" and a public client "mobile" limited to one redirect URI.
func newStandin(t *testing.T) (*Server, *httptest.Server) {
	t.Helper()
	s := New()
	s.AddClient(Client{ID: "vault", Secret: "vault-secret", Scopes: strings.Fields(scopes)})
	s.AddClient(Client{ID: "other", Secret: "other-secret", Scopes: strings.Fields(scopes)})
	s.AddClient(Client{ID: "mobile", Scopes: []string{"vehicle:read"}, RedirectURIs: []string{mobileCB}})
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	return s, ts
}

type reply struct {
	status int
	header http.Header
	body   string
	fields map[string]any
}

func (r reply) str(name string) string {
	v, _ := r.fields[name].(string)
	return v
}

// post POSTs form to path, with HTTP Basic credentials when basic is id and secret.
func post(t *testing.T, ts *httptest.Server, path string, form url.Values, basic ...string) reply {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, ts.URL+path, strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if len(basic) == 2 {
		req.SetBasicAuth(basic[0], basic[1])
	}
	return do(t, req)
}

func do(t *testing.T, req *http.Request) reply {
	t.Helper()
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	r := reply{status: resp.StatusCode, header: resp.Header, body: string(body)}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(body, &r.fields); err != nil {
			t.Fatalf("bad JSON %q: %v", body, err)
		}
	}
	return r
}

func wantError(t *testing.T, r reply, status int, code string) {
	t.Helper()
	if r.status != status || r.str("error") != code {
		t.Fatalf("got %d %s, want %d with error %q", r.status, r.body, status, code)
	}
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q", ct)
	}
}

func wantTokens(t *testing.T, r reply, scope string, refresh bool) {
	t.Helper()
	if r.status != http.StatusOK {
		t.Fatalf("got %d %s", r.status, r.body)
	}
	if !tokenValue.MatchString(r.str("access_token")) || r.fields["expires_in"] != 36000.0 ||
		r.str("token_type") != "Bearer" || r.str("scope") != scope {
		t.Errorf("token response %s", r.body)
	}
	if _, has := r.fields["refresh_token"]; has != refresh || (refresh && !tokenValue.MatchString(r.str("refresh_token"))) {
		t.Errorf("refresh_token in %s, want one: %v", r.body, refresh)
	}
	if r.header.Get("Cache-Control") != "no-store" {
		t.Errorf("Cache-Control %q", r.header.Get("Cache-Control"))
	}
}

func clientCredentials(extra ...string) url.Values {
	form := url.Values{"grant_type": {"client_credentials"}}
	for i := 0; i+1 < len(extra); i += 2 {
		form.Set(extra[i], extra[i+1])
	}
	return form
}

// authorizeURL builds the URL the contract tells users to open, with params added.
func authorizeURL(ts *httptest.Server, clientID, redirectURI string, params ...string) string {
	q := url.Values{"response_type": {"code"}, "client_id": {clientID}, "redirect_uri": {redirectURI}}
	for i := 0; i+1 < len(params); i += 2 {
		q.Set(params[i], params[i+1])
	}
	return ts.URL + "/o/authorize/?" + q.Encode()
}

// code has driver@example.com authorize the request and returns the code.
func code(t *testing.T, s *Server, target string) string {
	t.Helper()
	loc, err := s.Authorize(t.Context(), target, "driver@example.com", true)
	if err != nil {
		t.Fatal(err)
	}
	c := loc.Query().Get("code")
	if !tokenValue.MatchString(c) {
		t.Fatalf("no code in %s", loc)
	}
	return c
}

func exchange(code, redirectURI string, fields ...string) url.Values {
	form := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirectURI}}
	for i := 0; i+1 < len(fields); i += 2 {
		form.Set(fields[i], fields[i+1])
	}
	return form
}

func TestClientCredentials(t *testing.T) {
	s, ts := newStandin(t)
	for _, path := range []string{"/o/token", "/o/token/"} {
		r := post(t, ts, path, clientCredentials(), "vault", "vault-secret")
		wantTokens(t, r, scopes, false)
		info, ok := s.Token(r.str("access_token"))
		if !ok || info.Kind != "access" || info.ClientID != "vault" || info.User != "" ||
			info.Grant != "client_credentials" || info.Scope != scopes || !s.Active(info.Value) {
			t.Errorf("%s: token info %+v", path, info)
		}
	}
	r := post(t, ts, "/o/token", clientCredentials("scope", "vehicle:read"), "vault", "vault-secret")
	wantTokens(t, r, "vehicle:read", false)
	wantError(t, post(t, ts, "/o/token", clientCredentials("scope", "vehicle:write"), "vault", "vault-secret"), 400, "invalid_scope")
}

func TestClientCredentialsAuthenticatesByBasicOnly(t *testing.T) {
	s, ts := newStandin(t)
	for name, r := range map[string]reply{
		"form credentials": post(t, ts, "/o/token", clientCredentials("client_id", "vault", "client_secret", "vault-secret")),
		"wrong secret":     post(t, ts, "/o/token", clientCredentials(), "vault", "other-secret"),
		"unknown client":   post(t, ts, "/o/token", clientCredentials(), "nobody", "vault-secret"),
		"public client":    post(t, ts, "/o/token", clientCredentials(), "mobile", ""),
	} {
		t.Run(name, func(t *testing.T) { wantError(t, r, 401, "invalid_client") })
	}
	if n := len(s.Tokens()); n != 0 {
		t.Errorf("%d tokens issued to failed requests", n)
	}
}

func TestTokenEndpointRequests(t *testing.T) {
	_, ts := newStandin(t)
	wantError(t, post(t, ts, "/o/token", url.Values{}, "vault", "vault-secret"), 400, "unsupported_grant_type")
	wantError(t, post(t, ts, "/o/token", url.Values{"grant_type": {"password"}}, "vault", "vault-secret"), 400, "unsupported_grant_type")
	wantError(t, post(t, ts, "/o/token?grant_type=client_credentials", url.Values{}, "vault", "vault-secret"), 400, "invalid_request")
	wantError(t, post(t, ts, "/o/token", url.Values{"grant_type": {"client_credentials"}, "scope": {"vehicle:read", "vehicle:write"}}, "vault", "vault-secret"), 400, "invalid_request")

	r := post(t, ts, "/o/token", url.Values{"grant_type": {"authorization_code"}, "client_id": {"vault"}, "client_secret": {"vault-secret"}, "redirect_uri": {callback}})
	wantError(t, r, 400, "invalid_request")
	if !strings.Contains(r.str("error_description"), "code") {
		t.Errorf("description %q does not name code", r.str("error_description"))
	}
	r = post(t, ts, "/o/token", url.Values{"grant_type": {"refresh_token"}, "client_id": {"vault"}, "client_secret": {"vault-secret"}})
	wantError(t, r, 400, "invalid_request")
	if !strings.Contains(r.str("error_description"), "refresh_token") {
		t.Errorf("description %q does not name refresh_token", r.str("error_description"))
	}

	for _, method := range []string{http.MethodGet, http.MethodPut} {
		req, _ := http.NewRequestWithContext(t.Context(), method, ts.URL+"/o/token/", nil)
		if r := do(t, req); r.status != http.StatusMethodNotAllowed {
			t.Errorf("%s /o/token/: %d", method, r.status)
		}
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, ts.URL+"/o/tokens", nil)
	if r := do(t, req); r.status != http.StatusNotFound {
		t.Errorf("GET /o/tokens: %d", r.status)
	}
}

func TestAuthorizationCodeFlow(t *testing.T) {
	s, ts := newStandin(t)
	target := authorizeURL(ts, "vault", callback, "state", "st&te=1", "scope", "vehicle:read")
	loc, err := s.Authorize(t.Context(), target, "alice@example.com", true)
	if err != nil {
		t.Fatal(err)
	}
	if got := loc.Scheme + "://" + loc.Host + loc.Path; got != callback || loc.Query().Get("state") != "st&te=1" {
		t.Fatalf("redirected to %s", loc)
	}
	form := exchange(loc.Query().Get("code"), callback, "client_id", "vault", "client_secret", "vault-secret")
	r := post(t, ts, "/o/token", form)
	wantTokens(t, r, "vehicle:read", true)
	access, _ := s.Token(r.str("access_token"))
	refresh, _ := s.Token(r.str("refresh_token"))
	if access.User != "alice@example.com" || access.Grant != "authorization_code" || refresh.Kind != "refresh" ||
		refresh.User != "alice@example.com" || !refresh.ExpiresAt.IsZero() || refresh.Scope != "vehicle:read" {
		t.Errorf("tokens %+v %+v", access, refresh)
	}
	wantError(t, post(t, ts, "/o/token", form), 400, "invalid_grant") // a code is single use
}

func TestAuthorizationCodeChecks(t *testing.T) {
	s, ts := newStandin(t)
	target := authorizeURL(ts, "vault", callback)
	creds := []string{"client_id", "vault", "client_secret", "vault-secret"}
	for name, tc := range map[string]struct {
		form   func(code string) url.Values
		status int
		err    string
	}{
		"wrong secret": {func(c string) url.Values { return exchange(c, callback, "client_id", "vault", "client_secret", "x") }, 401, "invalid_client"},
		"no secret":    {func(c string) url.Values { return exchange(c, callback, "client_id", "vault") }, 401, "invalid_client"},
		"other client": {func(c string) url.Values {
			return exchange(c, callback, "client_id", "other", "client_secret", "other-secret")
		}, 400, "invalid_grant"},
		"other redirect":   {func(c string) url.Values { return exchange(c, callback+"/x", creds...) }, 400, "invalid_grant"},
		"unknown code":     {func(string) url.Values { return exchange("i8u3oRHEXajKcwzPgmujDbtMvDpaDs", callback, creds...) }, 400, "invalid_grant"},
		"missing redirect": {func(c string) url.Values { f := exchange(c, "", creds...); f.Del("redirect_uri"); return f }, 400, "invalid_request"},
	} {
		t.Run(name, func(t *testing.T) {
			c := code(t, s, target)
			wantError(t, post(t, ts, "/o/token", tc.form(c)), tc.status, tc.err)
			// A failed exchange leaves the code usable, as in DOT.
			wantTokens(t, post(t, ts, "/o/token", exchange(c, callback, creds...)), scopes, true)
		})
	}
}

func TestAuthorizationCodeLifetime(t *testing.T) {
	s, ts := newStandin(t)
	creds := []string{"client_id", "vault", "client_secret", "vault-secret"}
	c := code(t, s, authorizeURL(ts, "vault", callback))
	s.Advance(59 * time.Second)
	wantTokens(t, post(t, ts, "/o/token", exchange(c, callback, creds...)), scopes, true)

	c = code(t, s, authorizeURL(ts, "vault", callback))
	s.Advance(61 * time.Second)
	wantError(t, post(t, ts, "/o/token", exchange(c, callback, creds...)), 400, "invalid_grant")
}

func TestPKCE(t *testing.T) {
	s, ts := newStandin(t)
	pkce := []string{"code_challenge", challenge, "code_challenge_method", "S256"}

	// A public client gets tokens with client_id and the verifier alone.
	c := code(t, s, authorizeURL(ts, "mobile", mobileCB, pkce...))
	wantTokens(t, post(t, ts, "/o/token", exchange(c, mobileCB, "client_id", "mobile", "code_verifier", verifier)), "vehicle:read", true)

	// A confidential client that used PKCE must present the verifier too.
	creds := []string{"client_id", "vault", "client_secret", "vault-secret"}
	c = code(t, s, authorizeURL(ts, "vault", callback, pkce...))
	r := post(t, ts, "/o/token", exchange(c, callback, creds...))
	wantError(t, r, 400, "invalid_request")
	if !strings.Contains(r.str("error_description"), "code_verifier") {
		t.Errorf("description %q does not name code_verifier", r.str("error_description"))
	}
	otherVerifier := strings.Repeat("A", 43)
	wantError(t, post(t, ts, "/o/token", exchange(c, callback, append(creds, "code_verifier", otherVerifier)...)), 400, "invalid_grant")
	wantTokens(t, post(t, ts, "/o/token", exchange(c, callback, append(creds, "code_verifier", verifier)...)), scopes, true)

	// The verifier must be 43 to 128 unreserved characters even when its hash matches.
	for _, bad := range []string{strings.Repeat("a", 42), strings.Repeat("a", 129), strings.Repeat("a", 42) + "="} {
		sum := sha256.Sum256([]byte(bad))
		c := code(t, s, authorizeURL(ts, "vault", callback, "code_challenge", base64.RawURLEncoding.EncodeToString(sum[:]), "code_challenge_method", "S256"))
		wantError(t, post(t, ts, "/o/token", exchange(c, callback, append(creds, "code_verifier", bad)...)), 400, "invalid_grant")
	}
}

func TestAuthorizeRedirectsErrorsToClient(t *testing.T) {
	s, ts := newStandin(t)
	for name, tc := range map[string]struct {
		target, err string
	}{
		"public client without PKCE": {authorizeURL(ts, "mobile", mobileCB, "state", "s1"), "invalid_request"},
		"plain PKCE":                 {authorizeURL(ts, "vault", callback, "state", "s1", "code_challenge", verifier, "code_challenge_method", "plain"), "invalid_request"},
		"PKCE without method":        {authorizeURL(ts, "vault", callback, "state", "s1", "code_challenge", challenge), "invalid_request"},
		"scope not granted":          {authorizeURL(ts, "vault", callback, "state", "s1", "scope", "vehicle:write"), "invalid_scope"},
		"implicit grant":             {authorizeURL(ts, "vault", callback, "state", "s1", "response_type", "token"), "unsupported_response_type"},
	} {
		t.Run(name, func(t *testing.T) {
			loc, err := s.Authorize(t.Context(), tc.target, "driver@example.com", true)
			if err == nil || loc == nil || loc.Query().Get("error") != tc.err || loc.Query().Get("state") != "s1" || loc.Query().Has("code") {
				t.Fatalf("got %v, %v; want a redirect with error %s", loc, err, tc.err)
			}
		})
	}
}

func TestAuthorizeRefusesBadClientOrRedirect(t *testing.T) {
	s, ts := newStandin(t)
	for name, tc := range map[string]struct {
		target, message string
	}{
		"unknown client":      {authorizeURL(ts, "nobody", callback), "Invalid client_id"},
		"missing client":      {ts.URL + "/o/authorize/?response_type=code&redirect_uri=" + url.QueryEscape(callback), "Missing client_id"},
		"disallowed redirect": {authorizeURL(ts, "mobile", "https://evil.example/cb", "code_challenge", challenge, "code_challenge_method", "S256"), "Mismatching redirect URI"},
		"missing redirect":    {ts.URL + "/o/authorize/?response_type=code&client_id=vault", "Missing redirect URI"},
		"relative redirect":   {authorizeURL(ts, "vault", "/callback"), "Mismatching redirect URI"},
	} {
		t.Run(name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, tc.target, nil)
			r := do(t, req)
			if r.status != http.StatusBadRequest || r.header.Get("Location") != "" || !strings.Contains(r.body, tc.message) {
				t.Errorf("GET: %d %q", r.status, r.body)
			}
			if _, err := s.Authorize(t.Context(), tc.target, "driver@example.com", true); err == nil || !strings.Contains(err.Error(), tc.message) {
				t.Errorf("Authorize: %v", err)
			}
		})
	}
}

func TestConsentPage(t *testing.T) {
	_, ts := newStandin(t)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, authorizeURL(ts, "vault", callback, "state", `"><b>`), nil)
	r := do(t, req)
	for _, want := range []string{
		"Authorize vault?", "<li>charging_session:read</li>", "<li>vehicle:read</li>", `action="/o/authorize/"`,
		`id="user" value="driver@example.com"`, `<button type="submit" name="allow" value="Authorize" id="authorize">Authorize</button>`,
		`name="state" value="&#34;&gt;&lt;b&gt;"`,
	} {
		if !strings.Contains(r.body, want) {
			t.Errorf("consent page lacks %q:\n%s", want, r.body)
		}
	}
	if r.status != http.StatusOK {
		t.Errorf("status %d", r.status)
	}
}

func TestAuthorizeDeny(t *testing.T) {
	s, ts := newStandin(t)
	loc, err := s.Authorize(t.Context(), authorizeURL(ts, "vault", callback+"?tenant=1", "state", "s2"), "driver@example.com", false)
	if err != nil {
		t.Fatal(err)
	}
	q := loc.Query()
	if q.Get("error") != "access_denied" || q.Get("state") != "s2" || q.Get("tenant") != "1" || q.Has("code") {
		t.Errorf("redirected to %s", loc)
	}
}

func TestAuthorizePostNeedsUser(t *testing.T) {
	s, ts := newStandin(t)
	if _, err := s.Authorize(t.Context(), authorizeURL(ts, "vault", callback), " ", true); err == nil || !strings.Contains(err.Error(), "user") {
		t.Errorf("Authorize without a user: %v", err)
	}
	// The POST is validated like the GET.
	r := post(t, ts, "/o/authorize/", url.Values{"client_id": {"vault"}, "response_type": {"code"}, "redirect_uri": {"ftp"}, "user": {"u"}, "allow": {"Authorize"}})
	if r.status != http.StatusBadRequest {
		t.Errorf("POST with a bad redirect_uri: %d", r.status)
	}
}

// tokenPair runs the authorization code flow for client vault.
func tokenPair(t *testing.T, s *Server, ts *httptest.Server) (access, refresh string) {
	t.Helper()
	r := post(t, ts, "/o/token", exchange(code(t, s, authorizeURL(ts, "vault", callback)), callback, "client_id", "vault", "client_secret", "vault-secret"))
	wantTokens(t, r, scopes, true)
	return r.str("access_token"), r.str("refresh_token")
}

func refreshForm(token string, fields ...string) url.Values {
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {token}}
	for i := 0; i+1 < len(fields); i += 2 {
		form.Set(fields[i], fields[i+1])
	}
	return form
}

func TestRefreshRotates(t *testing.T) {
	s, ts := newStandin(t)
	access, refresh := tokenPair(t, s, ts)
	creds := []string{"client_id", "vault", "client_secret", "vault-secret"}

	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, "client_id", "vault")), 401, "invalid_client")
	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, "client_id", "other", "client_secret", "other-secret")), 400, "invalid_grant")
	wantError(t, post(t, ts, "/o/token", refreshForm(access, creds...)), 400, "invalid_grant")
	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, append(creds, "scope", "vehicle:write")...)), 400, "invalid_scope")
	if !s.Active(access) || !s.Active(refresh) {
		t.Fatal("failed refreshes revoked tokens")
	}

	r := post(t, ts, "/o/token", refreshForm(refresh, creds...))
	wantTokens(t, r, scopes, true)
	if s.Active(access) || s.Active(refresh) {
		t.Error("the old pair is still active after a refresh")
	}
	if !s.Active(r.str("access_token")) || !s.Active(r.str("refresh_token")) {
		t.Error("the new pair is not active")
	}
	info, _ := s.Token(r.str("refresh_token"))
	if info.Grant != "refresh_token" || info.User != "driver@example.com" {
		t.Errorf("new refresh token %+v", info)
	}
	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, creds...)), 400, "invalid_grant") // no grace period

	narrowed := post(t, ts, "/o/token", refreshForm(r.str("refresh_token"), append(creds, "scope", "vehicle:read")...))
	wantTokens(t, narrowed, "vehicle:read", true)
}

func TestRefreshPublicClient(t *testing.T) {
	s, ts := newStandin(t)
	c := code(t, s, authorizeURL(ts, "mobile", mobileCB, "code_challenge", challenge, "code_challenge_method", "S256"))
	r := post(t, ts, "/o/token", exchange(c, mobileCB, "client_id", "mobile", "code_verifier", verifier))
	wantTokens(t, r, "vehicle:read", true)
	wantTokens(t, post(t, ts, "/o/token", refreshForm(r.str("refresh_token"), "client_id", "mobile")), "vehicle:read", true)
}

func TestRevoke(t *testing.T) {
	s, ts := newStandin(t)
	creds := url.Values{"client_id": {"vault"}, "client_secret": {"vault-secret"}}
	revoke := func(token string, extra ...string) reply {
		form := url.Values{"token": {token}, "client_id": creds["client_id"], "client_secret": creds["client_secret"]}
		for i := 0; i+1 < len(extra); i += 2 {
			form.Set(extra[i], extra[i+1])
		}
		return post(t, ts, "/o/revoke_token/", form)
	}
	wantOK := func(r reply) {
		t.Helper()
		if r.status != http.StatusOK || r.body != "" {
			t.Fatalf("revoke: %d %q", r.status, r.body)
		}
	}

	access, refresh := tokenPair(t, s, ts)
	wantOK(revoke(access, "token_type_hint", "access_token"))
	if s.Active(access) || !s.Active(refresh) {
		t.Error("revoking an access token must revoke only it")
	}
	wantOK(revoke(access)) // already revoked

	access, refresh = tokenPair(t, s, ts)
	wantOK(revoke(refresh, "token_type_hint", "refresh_token"))
	if s.Active(access) || s.Active(refresh) {
		t.Error("revoking a refresh token must revoke its access token too")
	}
	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, "client_id", "vault", "client_secret", "vault-secret")), 400, "invalid_grant")

	wantOK(revoke("ELf3uR6tEyRFaL1mLVFmsAEfNZLpso")) // unknown

	cc := post(t, ts, "/o/token", clientCredentials(), "other", "other-secret").str("access_token")
	wantOK(revoke(cc))
	if !s.Active(cc) {
		t.Error("a client revoked another client's token")
	}

	wantError(t, revoke(cc, "client_secret", "wrong"), 401, "invalid_client")
	wantError(t, post(t, ts, "/o/revoke_token/", url.Values{"token": {cc}}, "other", "other-secret"), 401, "invalid_client")
	wantError(t, revoke(""), 400, "invalid_request")
	if !s.Active(cc) {
		t.Error("a refused revocation revoked the token")
	}

	for _, method := range []string{http.MethodPost, http.MethodGet} {
		req, _ := http.NewRequestWithContext(t.Context(), method, ts.URL+"/o/revoke_token", strings.NewReader(url.Values{"token": {cc}, "client_id": {"other"}, "client_secret": {"other-secret"}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if r := do(t, req); r.status != http.StatusMethodNotAllowed {
			t.Errorf("%s /o/revoke_token without the slash: %d", method, r.status)
		}
	}
	if !s.Active(cc) {
		t.Error("/o/revoke_token without the slash revoked the token")
	}
}

func TestExpiryAndLifetime(t *testing.T) {
	s, ts := newStandin(t)
	r := post(t, ts, "/o/token", clientCredentials(), "vault", "vault-secret")
	token := r.str("access_token")
	s.Advance(36000*time.Second - time.Minute)
	if !s.Active(token) {
		t.Fatal("token expired early")
	}
	s.Advance(time.Minute)
	if s.Active(token) {
		t.Fatal("token active after expires_in")
	}
	if info, _ := s.Token(token); info.Revoked {
		t.Error("an expired token is reported revoked")
	}

	_, refresh := tokenPair(t, s, ts)
	s.Advance(365 * 24 * time.Hour)
	if !s.Active(refresh) {
		t.Error("refresh tokens do not expire")
	}

	s.SetTokenLifetime(90 * time.Second)
	r = post(t, ts, "/o/token", clientCredentials(), "vault", "vault-secret")
	info, _ := s.Token(r.str("access_token"))
	s.Advance(89 * time.Second)
	active := s.Active(info.Value)
	s.Advance(time.Second)
	if r.fields["expires_in"] != 90.0 || !active || s.Active(info.Value) {
		t.Errorf("expires_in %v; active after 89 s: %v, after 90 s: %v", r.fields["expires_in"], active, s.Active(info.Value))
	}
}

func TestTokensInIssueOrder(t *testing.T) {
	s, ts := newStandin(t)
	var want []string
	for range 3 {
		want = append(want, post(t, ts, "/o/token", clientCredentials(), "vault", "vault-secret").str("access_token"))
	}
	access, refresh := tokenPair(t, s, ts)
	want = append(want, access, refresh)
	var got []string
	for _, info := range s.Tokens() {
		got = append(got, info.Value)
	}
	if !slices.Equal(got, want) {
		t.Errorf("Tokens() = %v, want %v", got, want)
	}
	s.Tokens()[0].Revoked = true
	if !s.Active(want[0]) {
		t.Error("Tokens() does not return copies")
	}
	if _, ok := s.Token("unknown"); ok || s.Active("unknown") {
		t.Error("an unknown token is known")
	}
}

func TestConcurrentUse(t *testing.T) {
	s, ts := newStandin(t)
	var wg sync.WaitGroup
	for range 40 {
		wg.Go(func() {
			req, _ := http.NewRequest(http.MethodPost, ts.URL+"/o/token", strings.NewReader("grant_type=client_credentials"))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth("vault", "vault-secret")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err) // not Fatal: this is not the test's goroutine
				return
			}
			resp.Body.Close()
			s.Tokens()
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, info := range s.Tokens() {
		if !s.Active(info.Value) || seen[info.Value] {
			t.Errorf("token %q inactive or repeated", info.Value)
		}
		seen[info.Value] = true
	}
	if len(seen) != 40 {
		t.Errorf("%d tokens, want 40", len(seen))
	}
}

var vaultCreds = []string{"client_id", "vault", "client_secret", "vault-secret"}

// newClient is an HTTP client of its own, so that a connection a fault breaks is no other test's.
func newClient(t *testing.T, timeout time.Duration) *http.Client {
	t.Helper()
	transport := &http.Transport{MaxIdleConnsPerHost: 64}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Timeout: timeout, Transport: transport}
}

// send POSTs form to the token endpoint and returns what became of it, failed connections included.
// It calls no t.Fatal, so goroutines may use it.
func send(t *testing.T, client *http.Client, ts *httptest.Server, form url.Values, basic ...string) (*http.Response, []byte, error) {
	req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, ts.URL+"/o/token/", strings.NewReader(form.Encode()))
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if len(basic) == 2 {
		req.SetBasicAuth(basic[0], basic[1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// waitFor polls cond until it holds, failing the test after 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

func TestFaults(t *testing.T) {
	for name, tc := range map[string]struct {
		fault   Fault
		timeout time.Duration
		check   func(t *testing.T, resp *http.Response, body []byte, err error)
	}{
		"rate limited": {Fault{Kind: FaultRateLimited, RetryAfter: 1500 * time.Millisecond}, 10 * time.Second,
			func(t *testing.T, resp *http.Response, body []byte, err error) {
				wantThrottled(t, resp, body, err, "2", "Request was throttled. Expected available in 2 seconds.")
			}},
		"rate limited for a second": {Fault{Kind: FaultRateLimited, RetryAfter: time.Second}, 10 * time.Second,
			func(t *testing.T, resp *http.Response, body []byte, err error) {
				wantThrottled(t, resp, body, err, "1", "Request was throttled. Expected available in 1 second.")
			}},
		"server error": {Fault{Kind: FaultServerError}, 10 * time.Second,
			func(t *testing.T, resp *http.Response, body []byte, err error) {
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != http.StatusInternalServerError || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") ||
					!strings.Contains(string(body), "<h1>Server Error (500)</h1>") || json.Valid(body) {
					t.Errorf("got %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
				}
			}},
		"garbage": {Fault{Kind: FaultGarbage}, 10 * time.Second,
			func(t *testing.T, resp *http.Response, body []byte, err error) {
				if err != nil {
					t.Fatal(err)
				}
				var fields map[string]any
				if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") ||
					len(body) == 0 || json.Unmarshal(body, &fields) == nil {
					t.Errorf("got %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
				}
			}},
		"hang up": {Fault{Kind: FaultHangUp}, 10 * time.Second,
			func(t *testing.T, resp *http.Response, body []byte, err error) {
				if err == nil || isTimeout(err) {
					t.Errorf("got %v, want the connection closed without a response", err)
				}
			}},
		"hang": {Fault{Kind: FaultHang}, 300 * time.Millisecond,
			func(t *testing.T, resp *http.Response, body []byte, err error) {
				if !isTimeout(err) {
					t.Errorf("got %v, want the client to time out", err)
				}
			}},
	} {
		t.Run(name, func(t *testing.T) {
			s, ts := newStandin(t)
			access, refresh := tokenPair(t, s, ts)
			before := len(s.Tokens())
			client := newClient(t, tc.timeout)
			s.SetFault(tc.fault)
			for range 2 { // Count 0: the fault stays
				resp, body, err := send(t, client, ts, refreshForm(refresh, vaultCreds...))
				tc.check(t, resp, body, err)
				resp, body, err = send(t, client, ts, clientCredentials(), "vault", "vault-secret")
				tc.check(t, resp, body, err)
			}
			waitFor(t, "the client's going away releases held requests", func() bool { return s.Held() == 0 })
			if n := len(s.Tokens()); n != before {
				t.Errorf("faulted requests issued %d tokens", n-before)
			}
			if !s.Active(access) || !s.Active(refresh) {
				t.Error("a faulted refresh revoked the old pair")
			}
			s.SetFault(Fault{})
			resp, body, err := send(t, client, ts, refreshForm(refresh, vaultCreds...))
			if err != nil {
				t.Errorf("after SetFault(Fault{}): %v", err)
			} else if resp.StatusCode != http.StatusOK || !json.Valid(body) {
				t.Errorf("after SetFault(Fault{}): status %d", resp.StatusCode)
			}
		})
	}
}

func wantThrottled(t *testing.T, resp *http.Response, body []byte, err error, retryAfter, detail string) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]any
	if err := json.Unmarshal(body, &fields); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != retryAfter ||
		resp.Header.Get("Content-Type") != "application/json" || fields["detail"] != detail || len(fields) != 1 {
		t.Errorf("got %d, Retry-After %q, %q %s", resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"), body)
	}
}

// TestFaultShare: a fault with a Share fails that share of token requests, the same ones for the
// same Seed.
func TestFaultShare(t *testing.T) {
	s, ts := newStandin(t)
	client := newClient(t, 10*time.Second)
	statuses := func() []int {
		s.SetFault(Fault{Kind: FaultServerError, Share: 0.8, Seed: 19})
		var out []int
		for range 200 {
			resp, _, err := send(t, client, ts, clientCredentials(), "vault", "vault-secret")
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, resp.StatusCode)
		}
		return out
	}
	first := statuses()
	failed := 0
	for _, status := range first {
		if status == http.StatusInternalServerError {
			failed++
		}
	}
	if failed < 140 || failed > 180 {
		t.Errorf("%d of 200 requests failed, want about 160", failed)
	}
	if again := statuses(); !slices.Equal(first, again) {
		t.Error("the same Seed failed other requests")
	}
}

func TestFaultCount(t *testing.T) {
	s, ts := newStandin(t)
	client := newClient(t, 10*time.Second)
	s.SetFault(Fault{Kind: FaultServerError, Count: 2})
	var statuses []int
	for range 4 {
		resp, _, err := send(t, client, ts, clientCredentials(), "vault", "vault-secret")
		if err != nil {
			t.Fatal(err)
		}
		statuses = append(statuses, resp.StatusCode)
	}
	if !slices.Equal(statuses, []int{500, 500, 200, 200}) {
		t.Errorf("statuses %v, want two 500s and then healthy", statuses)
	}
	if n := len(s.Tokens()); n != 2 {
		t.Errorf("%d tokens, want 2", n)
	}

	s.SetFault(Fault{Kind: FaultHangUp, Count: 1})
	if _, _, err := send(t, client, ts, clientCredentials(), "vault", "vault-secret"); err == nil {
		t.Error("the first request after FaultHangUp got an answer")
	}
	if resp, _, err := send(t, client, ts, clientCredentials(), "vault", "vault-secret"); err != nil {
		t.Errorf("the second request after FaultHangUp with Count 1: %v", err)
	} else if resp.StatusCode != http.StatusOK {
		t.Errorf("the second request after FaultHangUp with Count 1: status %d", resp.StatusCode)
	}
}

func TestFaultsSpareAuthorizeAndRevoke(t *testing.T) {
	s, ts := newStandin(t)
	_, refresh := tokenPair(t, s, ts)
	s.SetFault(Fault{Kind: FaultHangUp})
	code(t, s, authorizeURL(ts, "vault", callback))
	r := post(t, ts, "/o/revoke_token/", url.Values{"token": {refresh}, "client_id": {"vault"}, "client_secret": {"vault-secret"}})
	if r.status != http.StatusOK || s.Active(refresh) {
		t.Errorf("revoke under a token endpoint fault: %d, still active: %v", r.status, s.Active(refresh))
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, ts.URL+"/o/token/", nil)
	if r := do(t, req); r.status != http.StatusMethodNotAllowed {
		t.Errorf("GET /o/token/ under a fault: %d", r.status)
	}
}

func TestFaultIssueThenHangUp(t *testing.T) {
	s, ts := newStandin(t)
	client := newClient(t, 10*time.Second)
	s.SetFault(Fault{Kind: FaultIssueThenHangUp, Count: 1})
	if _, _, err := send(t, client, ts, clientCredentials(), "vault", "vault-secret"); err == nil || isTimeout(err) {
		t.Errorf("got %v, want the connection closed without a response", err)
	}
	tokens := s.Tokens()
	if len(tokens) != 1 || tokens[0].Kind != "access" || tokens[0].Grant != "client_credentials" || !s.Active(tokens[0].Value) {
		t.Fatalf("%d tokens issued, want one active client_credentials access token", len(tokens))
	}

	// A refresh whose answer is lost has rotated the pair: the client's refresh token is dead.
	access, refresh := tokenPair(t, s, ts)
	before := len(s.Tokens())
	s.SetFault(Fault{Kind: FaultIssueThenHangUp})
	if _, _, err := send(t, client, ts, refreshForm(refresh, vaultCreds...)); err == nil {
		t.Error("a refresh got an answer under FaultIssueThenHangUp")
	}
	s.SetFault(Fault{})
	tokens = s.Tokens()
	if len(tokens) != before+2 || tokens[before].Kind != "access" || tokens[before+1].Kind != "refresh" ||
		!s.Active(tokens[before].Value) || !s.Active(tokens[before+1].Value) {
		t.Errorf("%d tokens issued by the lost refresh, want one active pair", len(tokens)-before)
	}
	if s.Active(access) || s.Active(refresh) {
		t.Error("the lost refresh did not rotate the old pair")
	}
	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, vaultCreds...)), 400, "invalid_grant")
}

// wantHungUpOnRelease calls SetFault, which must end the held request whose error errc gives
// without a response.
func wantHungUpOnRelease(t *testing.T, s *Server, errc <-chan error) {
	t.Helper()
	s.SetFault(Fault{})
	select {
	case err := <-errc:
		if err == nil || isTimeout(err) {
			t.Errorf("got %v, want the connection closed without a response", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SetFault did not release the held request")
	}
}

func TestFaultHangReleasedBySetFault(t *testing.T) {
	s, ts := newStandin(t)
	s.SetFault(Fault{Kind: FaultHang})
	errc := make(chan error, 1)
	go func() {
		_, _, err := send(t, newClient(t, 30*time.Second), ts, clientCredentials(), "vault", "vault-secret")
		errc <- err
	}()
	waitFor(t, "the request is held", func() bool { return s.Held() == 1 })
	select {
	case err := <-errc:
		t.Fatalf("a held request ended: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	wantHungUpOnRelease(t, s, errc)
	if n := len(s.Tokens()); n != 0 {
		t.Errorf("the held request issued %d tokens", n)
	}
	wantTokens(t, post(t, ts, "/o/token", clientCredentials(), "vault", "vault-secret"), scopes, false)
}

func TestLatency(t *testing.T) {
	s, ts := newStandin(t)
	const latency = 200 * time.Millisecond
	s.SetLatency(latency)
	start := time.Now()
	wantTokens(t, post(t, ts, "/o/token", clientCredentials(), "vault", "vault-secret"), scopes, false)
	wantError(t, post(t, ts, "/o/token", clientCredentials(), "vault", "wrong"), 401, "invalid_client")
	if elapsed := time.Since(start); elapsed < 2*latency {
		t.Errorf("a success and an error took %v, want at least %v", elapsed, 2*latency)
	}

	client := newClient(t, 10*time.Second)
	var wg sync.WaitGroup
	start = time.Now()
	for range 20 {
		wg.Go(func() {
			resp, _, err := send(t, client, ts, clientCredentials(), "vault", "vault-secret")
			if err != nil {
				t.Error(err) // not Fatal: this is not the test's goroutine
			} else if resp.StatusCode != http.StatusOK {
				t.Errorf("status %d", resp.StatusCode)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if elapsed < latency || elapsed >= 2*time.Second { // one after another they would take 4 s
		t.Errorf("20 concurrent requests with %v latency took %v", latency, elapsed)
	}
	if n := len(s.Tokens()); n != 21 {
		t.Errorf("%d tokens, want 21", n)
	}
}

func TestLatencyClientGoesAway(t *testing.T) {
	s, ts := newStandin(t)
	access, refresh := tokenPair(t, s, ts)
	before := len(s.Tokens())
	s.SetLatency(300 * time.Millisecond)
	if _, _, err := send(t, newClient(t, 50*time.Millisecond), ts, refreshForm(refresh, vaultCreds...)); !isTimeout(err) {
		t.Fatalf("got %v, want the client to time out", err)
	}
	// The stand-in goes on as a real server would: after the delay it rotates the pair.
	waitFor(t, "the refresh is done", func() bool { return len(s.Tokens()) == before+2 })
	if s.Active(access) || s.Active(refresh) {
		t.Error("the old pair is active after the refresh the client gave up on")
	}
}

func TestIssueUserGrant(t *testing.T) {
	s, ts := newStandin(t)
	refresh, err := s.IssueUserGrant("vault", "alice@example.com", "")
	if err != nil {
		t.Fatal(err)
	}
	tokens := s.Tokens()
	if len(tokens) != 2 || !tokenValue.MatchString(refresh) || tokens[1].Value != refresh {
		t.Fatalf("%d tokens issued, want an access and a refresh token", len(tokens))
	}
	for i, kind := range []string{"access", "refresh"} {
		info := tokens[i]
		if info.Kind != kind || info.ClientID != "vault" || info.User != "alice@example.com" ||
			info.Grant != "authorization_code" || info.Scope != scopes || !s.Active(info.Value) {
			t.Errorf("%s token: kind %q client %q user %q grant %q scope %q", kind, info.Kind, info.ClientID, info.User, info.Grant, info.Scope)
		}
	}
	r := post(t, ts, "/o/token", refreshForm(refresh, vaultCreds...))
	wantTokens(t, r, scopes, true)
	if info, _ := s.Token(r.str("access_token")); info.User != "alice@example.com" || s.Active(tokens[0].Value) {
		t.Errorf("refreshed for user %q; old access token active: %v", info.User, s.Active(tokens[0].Value))
	}

	narrow, err := s.IssueUserGrant("mobile", "bob@example.com", "vehicle:read")
	if err != nil {
		t.Fatal(err)
	}
	wantTokens(t, post(t, ts, "/o/token", refreshForm(narrow, "client_id", "mobile")), "vehicle:read", true)

	issued := len(s.Tokens())
	for name, args := range map[string][3]string{
		"unknown client": {"nobody", "alice@example.com", ""},
		"scope":          {"mobile", "alice@example.com", "charging_session:read"},
		"no user":        {"vault", " ", ""},
	} {
		if _, err := s.IssueUserGrant(args[0], args[1], args[2]); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if n := len(s.Tokens()); n != issued {
		t.Errorf("refused grants issued %d tokens", n-issued)
	}
}

func TestCounts(t *testing.T) {
	s, ts := newStandin(t)
	want := func(issued, active int) {
		t.Helper()
		if i, a := s.Counts(); i != issued || a != active {
			t.Errorf("Counts() = %d, %d; want %d, %d", i, a, issued, active)
		}
	}
	want(0, 0)
	post(t, ts, "/o/token", clientCredentials(), "vault", "vault-secret")
	first, _ := s.IssueUserGrant("vault", "alice@example.com", "")
	second, _ := s.IssueUserGrant("vault", "bob@example.com", "")
	want(3, 3) // refresh tokens are not counted
	post(t, ts, "/o/revoke_token/", url.Values{"token": {first}, "client_id": {"vault"}, "client_secret": {"vault-secret"}})
	want(3, 2)
	wantTokens(t, post(t, ts, "/o/token", refreshForm(second, vaultCreds...)), scopes, true)
	want(4, 2)
	s.Advance(36000 * time.Second)
	want(4, 0)
}

func TestConcurrentRefreshes(t *testing.T) {
	s, ts := newStandin(t)
	const grants, workers = 300, 50
	refreshes := make(chan string, grants)
	for i := range grants {
		refresh, err := s.IssueUserGrant("vault", fmt.Sprintf("driver-%d@example.com", i), "")
		if err != nil {
			t.Fatal(err)
		}
		refreshes <- refresh
	}
	close(refreshes)
	s.SetLatency(20 * time.Millisecond)
	client := newClient(t, 30*time.Second)
	var wg sync.WaitGroup
	var mu sync.Mutex
	failures := 0
	for range workers {
		wg.Go(func() {
			for refresh := range refreshes {
				resp, body, err := send(t, client, ts, refreshForm(refresh, vaultCreds...))
				var fields map[string]any
				if err != nil || resp.StatusCode != http.StatusOK || json.Unmarshal(body, &fields) != nil || fields["refresh_token"] == nil {
					mu.Lock()
					failures++
					mu.Unlock()
				}
				s.Counts()
			}
		})
	}
	wg.Wait()
	if failures > 0 {
		t.Errorf("%d of %d refreshes failed", failures, grants)
	}
	if issued, active := s.Counts(); issued != 2*grants || active != grants {
		t.Errorf("Counts() = %d, %d; want %d, %d", issued, active, 2*grants, grants)
	}
}

func TestRedirect(t *testing.T) {
	s, ts := newStandin(t)
	_, refresh := tokenPair(t, s, ts)
	var arrived []string
	var mu sync.Mutex
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		arrived = append(arrived, r.URL.Path)
	}))
	t.Cleanup(target.Close)
	s.SetRedirect(target.URL + "/")
	issued := len(s.Tokens())

	for path, form := range map[string]url.Values{
		"/o/token":         refreshForm(refresh, vaultCreds...),
		"/o/token/":        clientCredentials(),
		"/o/revoke_token/": {"token": {refresh}, "client_id": {"vault"}, "client_secret": {"vault-secret"}},
	} {
		r := post(t, ts, path, form, "vault", "vault-secret")
		if r.status != http.StatusTemporaryRedirect || r.header.Get("Location") != target.URL+path {
			t.Errorf("%s: %d to %q, want 307 to the same path at the target", path, r.status, r.header.Get("Location"))
		}
	}
	if len(s.Tokens()) != issued || !s.Active(refresh) || s.TokenRequests() != 1 {
		t.Fatalf("a redirected request was handled (%d token requests in all)", s.TokenRequests())
	}
	// A client that follows the redirect sends the form, secrets included, to the target.
	resp, err := http.PostForm(ts.URL+"/o/token", refreshForm(refresh, vaultCreds...))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	mu.Lock()
	if len(arrived) != 1 || arrived[0] != "/o/token" {
		t.Errorf("the target saw %v, want the followed token request", arrived)
	}
	mu.Unlock()

	s.SetRedirect("")
	wantTokens(t, post(t, ts, "/o/token", refreshForm(refresh, vaultCreds...)), scopes, true)
}

func TestRequestCounts(t *testing.T) {
	s, ts := newStandin(t)
	_, refresh := tokenPair(t, s, ts)
	s.SetFault(Fault{Kind: FaultServerError, Count: 1})
	post(t, ts, "/o/token", refreshForm(refresh, vaultCreds...)) // fails, so the token stays live
	if s.RepeatedRefreshTokens() != 0 {
		t.Fatal("a refresh token presented once counted as repeated")
	}
	rotated := post(t, ts, "/o/token", refreshForm(refresh, vaultCreds...))
	wantTokens(t, rotated, scopes, true)
	wantError(t, post(t, ts, "/o/token", refreshForm(refresh, vaultCreds...)), 400, "invalid_grant")
	post(t, ts, "/o/token", refreshForm(rotated.str("refresh_token"), vaultCreds...))
	if got := s.RepeatedRefreshTokens(); got != 2 {
		t.Errorf("RepeatedRefreshTokens = %d, want 2 (the retry after the fault and the rotated-out token)", got)
	}
	if got := s.TokenRequests(); got != 5 {
		t.Errorf("TokenRequests = %d, want 5 (the code exchange and four refreshes)", got)
	}
}

func TestHangRefreshTokenHoldsOnlyThatToken(t *testing.T) {
	s, ts := newStandin(t)
	_, hungRefresh := tokenPair(t, s, ts)
	_, otherRefresh := tokenPair(t, s, ts)
	creds := []string{"client_id", "vault", "client_secret", "vault-secret"}
	s.HangRefreshToken(hungRefresh)
	errc := make(chan error, 1)
	go func() {
		_, _, err := send(t, newClient(t, 30*time.Second), ts, refreshForm(hungRefresh, creds...))
		errc <- err
	}()
	waitFor(t, "the refresh of the hung token is held", func() bool { return s.Held() == 1 })

	// Everything else is answered meanwhile: another token's refresh, a client_credentials grant.
	wantTokens(t, post(t, ts, "/o/token/", refreshForm(otherRefresh, creds...)), scopes, true)
	wantTokens(t, post(t, ts, "/o/token/", clientCredentials(), "vault", "vault-secret"), scopes, false)
	select {
	case err := <-errc:
		t.Fatalf("the hung refresh ended: %v", err)
	default:
	}

	wantHungUpOnRelease(t, s, errc)
	if !s.Active(hungRefresh) {
		t.Error("the hung refresh rotated its token")
	}
	// Released, the token refreshes again.
	wantTokens(t, post(t, ts, "/o/token/", refreshForm(hungRefresh, creds...)), scopes, true)
}

// TestApprovalPromptAuto checks DOT's approval_prompt=auto: a browser logged in as a user who holds
// a live access token of the client, covering the scopes asked for, is sent back at once with a
// code; anything less shows the consent page.
func TestApprovalPromptAuto(t *testing.T) {
	s, ts := newStandin(t)
	auto := func(clientID string, params ...string) string {
		return authorizeURL(ts, clientID, callback, append([]string{"approval_prompt", "auto", "state", "s3"}, params...)...)
	}
	// consentShown opens target in browser as user, denying access if a consent page is shown: a
	// code comes back only when the stand-in approved at once.
	consentShown := func(browser *Browser, target, user string) bool {
		t.Helper()
		loc, err := browser.Authorize(t.Context(), target, user, false)
		if loc == nil {
			t.Fatal(err)
		}
		return !loc.Query().Has("code")
	}
	browser := NewBrowser()
	if !consentShown(browser, auto("vault"), "bob@example.com") {
		t.Fatal("a browser nobody had logged in with was approved at once")
	}
	if !consentShown(browser, auto("vault"), "bob@example.com") {
		t.Fatal("a user who logged in but never allowed the client was approved at once")
	}
	loc, err := browser.Authorize(t.Context(), authorizeURL(ts, "vault", callback, "scope", "vehicle:read"), "bob@example.com", true)
	if err != nil {
		t.Fatal(err)
	}
	creds := []string{"client_id", "vault", "client_secret", "vault-secret"}
	narrow := post(t, ts, "/o/token", exchange(loc.Query().Get("code"), callback, creds...))
	wantTokens(t, narrow, "vehicle:read", true)
	if !consentShown(browser, auto("vault"), "bob@example.com") {
		t.Fatal("approved at once for scopes beyond those of the user's token")
	}

	loc, err = browser.Authorize(t.Context(), authorizeURL(ts, "vault", callback), "bob@example.com", true)
	if err != nil {
		t.Fatal(err)
	}
	wantTokens(t, post(t, ts, "/o/token", exchange(loc.Query().Get("code"), callback, creds...)), scopes, true)
	loc, err = browser.Authorize(t.Context(), auto("vault"), "mallory@example.com", false)
	if err != nil || !loc.Query().Has("code") || loc.Query().Get("state") != "s3" || loc.Scheme+"://"+loc.Host+loc.Path != callback {
		t.Fatalf("approval at once: %v, redirected to %v", err, loc)
	}
	r := post(t, ts, "/o/token", exchange(loc.Query().Get("code"), callback, creds...))
	wantTokens(t, r, scopes, true)
	if info, _ := s.Token(r.str("access_token")); info.User != "bob@example.com" {
		t.Fatalf("the code approved at once is of user %q, want the logged-in bob@example.com", info.User)
	}

	for name, target := range map[string]string{
		"without approval_prompt":   authorizeURL(ts, "vault", callback),
		"approval_prompt=force":     authorizeURL(ts, "vault", callback, "approval_prompt", "force"),
		"another client":            auto("other"),
		"an invalid request":        auto("vault", "scope", "vehicle:write"),
		"from a browser logged out": "",
	} {
		b := browser
		if target == "" {
			b, target = NewBrowser(), auto("vault")
		}
		loc, _ := b.Authorize(t.Context(), target, "bob@example.com", false)
		if loc == nil || loc.Query().Has("code") {
			t.Errorf("%s: approved at once (%v)", name, loc)
		}
	}
	for _, info := range s.Tokens() {
		if info.User == "bob@example.com" && info.Kind == "refresh" {
			post(t, ts, "/o/revoke_token/", url.Values{"token": {info.Value}, "client_id": {"vault"}, "client_secret": {"vault-secret"}})
		}
	}
	if !consentShown(browser, auto("vault"), "bob@example.com") {
		t.Fatal("approved at once after the user's tokens were revoked")
	}
}
