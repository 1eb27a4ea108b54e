// Package standin is an HTTP stand-in for ev.energy's OAuth 2 server (django-oauth-toolkit with
// its defaults): the authorize, token and revoke_token endpoints, strict to ev.energy's contract
// so that a plugin that strays from it fails its tests.
package standin

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// codeLifetime is how long an authorization code may be exchanged: "valid for 1 minute".
const codeLifetime = 60 * time.Second

// Client is an OAuth application registered at the stand-in.
type Client struct {
	ID           string
	Secret       string   // empty: a public client (authorization_code with PKCE and refresh only)
	Scopes       []string // scopes this application may get; also the default when a request names none
	RedirectURIs []string // allowed redirect URIs (exact match); empty allows any
}

// TokenInfo is what the stand-in knows of one token it issued.
type TokenInfo struct {
	Value     string
	Kind      string // "access" or "refresh"
	ClientID  string
	User      string    // the ev.energy user for authorization_code grants; "" for client_credentials
	Grant     string    // grant_type that issued it: "client_credentials", "authorization_code", "refresh_token"
	Scope     string    // space separated
	ExpiresAt time.Time // zero for refresh tokens (they do not expire)
	Revoked   bool
}

// Server is the stand-in; serve it with httptest.NewServer or http.Server.
type Server struct {
	mu            sync.Mutex
	clients       map[string]Client
	codes         map[string]*grant
	tokens        map[string]*token
	issued        []*token // every token, in issue order
	tokenLifetime time.Duration
	offset        time.Duration     // added to the real clock by Advance
	fault         Fault             // what SetFault put on the token endpoint; Count is what is left of it
	draws         *mathrand.Rand    // decides which requests a Fault with a Share gets, from its Seed
	release       chan struct{}     // closed by SetFault to release the requests FaultHang and HangRefreshToken hold
	held          int               // requests FaultHang and HangRefreshToken hold
	hungRefreshes map[string]bool   // refresh tokens whose refresh requests HangRefreshToken holds
	latency       time.Duration     // delay of every token endpoint answer
	redirect      string            // SetRedirect's target; "" answers as usual
	requests      int               // token endpoint requests received
	presented     map[string]bool   // refresh tokens refresh requests have presented
	repeated      int               // refresh requests presenting a refresh token an earlier one presented
	sessions      map[string]string // the user logged in with each session cookie the consent page set
}

// grant is an authorization code and what the user consented to.
type grant struct {
	clientID, user, redirectURI, scope, challenge string
	issued                                        time.Time
	used                                          bool
}

type token struct {
	TokenInfo
	pair *token // the access token of a refresh token and vice versa, revoked along with it
}

// New returns a stand-in with no clients, 36000 s access tokens and the real clock.
func New() *Server {
	return &Server{
		clients:       map[string]Client{},
		codes:         map[string]*grant{},
		tokens:        map[string]*token{},
		presented:     map[string]bool{},
		hungRefreshes: map[string]bool{},
		sessions:      map[string]string{},
		tokenLifetime: 36000 * time.Second,
		release:       make(chan struct{}),
	}
}

// AddClient registers c, replacing any client with the same ID.
func (s *Server) AddClient(c Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.Scopes = slices.Clone(c.Scopes)
	c.RedirectURIs = slices.Clone(c.RedirectURIs)
	s.clients[c.ID] = c
}

// SetTokenLifetime sets the lifetime (expires_in) of access tokens issued from now on.
func (s *Server) SetTokenLifetime(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenLifetime = d
}

// Advance moves the stand-in's clock forward: codes and tokens expire by it.
func (s *Server) Advance(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.offset += d
}

// Active reports whether token was issued here and is neither revoked nor expired.
func (s *Server) Active(token string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tokens[token]
	return ok && t.active(s.now())
}

// active reports whether t is neither revoked nor expired at now.
func (t *token) active(now time.Time) bool {
	return !t.Revoked && (t.ExpiresAt.IsZero() || now.Before(t.ExpiresAt))
}

// Token returns what the stand-in knows of the token with that value.
func (s *Server) Token(value string) (TokenInfo, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tokens[value]
	if !ok {
		return TokenInfo{}, false
	}
	return t.TokenInfo, true
}

// Tokens returns every token issued, in issue order.
func (s *Server) Tokens() []TokenInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	infos := make([]TokenInfo, len(s.issued))
	for i, t := range s.issued {
		infos[i] = t.TokenInfo
	}
	return infos
}

// Counts returns how many access tokens were issued in all and how many of them are active
// (neither revoked nor expired by the stand-in's clock).
func (s *Server) Counts() (issued, active int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for _, t := range s.issued {
		if t.Kind != "access" {
			continue
		}
		issued++
		if t.active(now) {
			active++
		}
	}
	return issued, active
}

// IssueUserGrant issues an access and refresh token to the client for user, as exchanging an
// authorization code that user consented to would, and returns the refresh token; scope "" means
// all the client's scopes.
func (s *Server) IssueUserGrant(clientID, user, scope string) (refreshToken string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.clients[clientID]
	if !ok {
		return "", fmt.Errorf("stand-in: unknown client %q", clientID)
	}
	user = strings.TrimSpace(user)
	if user == "" {
		return "", errors.New("stand-in: a user grant needs a user")
	}
	granted, ok := scopeWithin(scope, c.Scopes)
	if !ok {
		return "", fmt.Errorf("stand-in: scope %q is not within client %q's scopes", scope, clientID)
	}
	return s.issue(c, user, "authorization_code", granted, true).RefreshToken, nil
}

// ServeHTTP routes the /o/ endpoints the way ev.energy's URLs do.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.redirected(w, r) {
		return
	}
	switch r.URL.Path {
	case "/o/token", "/o/token/":
		if onlyMethods(w, r, http.MethodPost) {
			s.token(w, r)
		}
	case "/o/revoke_token/":
		if onlyMethods(w, r, http.MethodPost) {
			s.revoke(w, r)
		}
	case "/o/revoke_token":
		// The contract: "the trailing slash on this URL is required. You will receive a 405 error without it."
		http.Error(w, "Method Not Allowed: the trailing slash is required", http.StatusMethodNotAllowed)
	case "/o/authorize", "/o/authorize/":
		if onlyMethods(w, r, http.MethodGet, http.MethodPost) {
			s.authorize(w, r)
		}
	default:
		http.NotFound(w, r)
	}
}

func onlyMethods(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	if slices.Contains(methods, r.Method) {
		return true
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	http.Error(w, http.StatusText(http.StatusMethodNotAllowed), http.StatusMethodNotAllowed)
	return false
}

// now is the stand-in's clock; call it with s.mu held.
func (s *Server) now() time.Time { return time.Now().Add(s.offset) }

// oauthError is an RFC 6749 section 5.2 error response.
type oauthError struct {
	status      int
	Code        string `json:"error"`
	Description string `json:"error_description,omitempty"`
}

var errInvalidClient = &oauthError{status: http.StatusUnauthorized, Code: "invalid_client"}

func badRequest(code, description string) *oauthError {
	return &oauthError{status: http.StatusBadRequest, Code: code, Description: description}
}

type tokenResponse struct {
	AccessToken  string `json:"access_token"`
	ExpiresIn    int64  `json:"expires_in"`
	TokenType    string `json:"token_type"`
	Scope        string `json:"scope"`
	RefreshToken string `json:"refresh_token,omitempty"`
}

// token is the token endpoint: it takes the request's fault when it arrives, reads the request,
// waits out the latency without holding s.mu and then answers (or fails as the fault says).
func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	fault, release := s.takeFault()
	latency := s.latency
	s.requests++
	s.mu.Unlock()
	// Read the whole body first: net/http notices a client going away (and cancels r.Context())
	// only once the body is read.
	form, oerr := postForm(r)
	hang := fault.Kind == FaultHang
	if refresh := form.Get("refresh_token"); oerr == nil && form.Get("grant_type") == "refresh_token" && refresh != "" {
		s.mu.Lock()
		if s.presented[refresh] {
			s.repeated++
		}
		s.presented[refresh] = true
		hang = hang || s.hungRefreshes[refresh]
		s.mu.Unlock()
	}
	if hang {
		s.hold(w, r, release)
		return
	}
	// Like the real server, this goes on after the client has gone: the tokens are still issued.
	time.Sleep(latency)
	if answerFault(w, fault) {
		return
	}
	var resp *tokenResponse
	if oerr == nil {
		s.mu.Lock()
		switch form.Get("grant_type") {
		case "client_credentials":
			resp, oerr = s.clientCredentials(r, form)
		case "authorization_code":
			resp, oerr = s.authorizationCode(form)
		case "refresh_token":
			resp, oerr = s.refresh(form)
		default:
			oerr = badRequest("unsupported_grant_type", "")
		}
		s.mu.Unlock()
	}
	if fault.Kind == FaultIssueThenHangUp {
		hangUp(w)
		return
	}
	if oerr != nil {
		writeJSON(w, oerr.status, oerr)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) clientCredentials(r *http.Request, form url.Values) (*tokenResponse, *oauthError) {
	// The contract authenticates this grant by HTTP Basic only; a public client cannot use it.
	id, secret, ok := r.BasicAuth()
	// DOT unquotes both halves (RFC 6749 2.3.1 form-encodes them before base64).
	id, idErr := url.QueryUnescape(id)
	secret, secretErr := url.QueryUnescape(secret)
	ok = ok && idErr == nil && secretErr == nil
	c, known := s.clients[id]
	if !ok || !known || c.Secret == "" || !equal(secret, c.Secret) {
		return nil, errInvalidClient
	}
	scope, ok := scopeWithin(form.Get("scope"), c.Scopes)
	if !ok {
		return nil, badRequest("invalid_scope", "")
	}
	return s.issue(c, "", "client_credentials", scope, false), nil
}

func (s *Server) authorizationCode(form url.Values) (*tokenResponse, *oauthError) {
	if oerr := required(form, "code", "redirect_uri"); oerr != nil {
		return nil, oerr
	}
	c, oerr := s.formClient(form)
	if oerr != nil {
		return nil, oerr
	}
	g, ok := s.codes[form.Get("code")]
	switch {
	case !ok || g.clientID != c.ID:
		return nil, badRequest("invalid_grant", "Invalid authorization code.")
	case g.used:
		return nil, badRequest("invalid_grant", "Authorization code already used.")
	case s.now().Sub(g.issued) > codeLifetime:
		return nil, badRequest("invalid_grant", "Authorization code expired.")
	case form.Get("redirect_uri") != g.redirectURI:
		return nil, badRequest("invalid_grant", "Mismatching redirect URI.")
	}
	if g.challenge != "" {
		verifier := form.Get("code_verifier")
		switch {
		case verifier == "":
			return nil, badRequest("invalid_request", "Missing code_verifier parameter.")
		case !verifierPattern.MatchString(verifier):
			return nil, badRequest("invalid_grant", "code_verifier must be 43 to 128 unreserved characters (RFC 7636).")
		case !equal(s256(verifier), g.challenge):
			return nil, badRequest("invalid_grant", "code_verifier does not match the code_challenge.")
		}
	}
	g.used = true
	return s.issue(c, g.user, "authorization_code", g.scope, true), nil
}

func (s *Server) refresh(form url.Values) (*tokenResponse, *oauthError) {
	if oerr := required(form, "refresh_token"); oerr != nil {
		return nil, oerr
	}
	c, oerr := s.formClient(form)
	if oerr != nil {
		return nil, oerr
	}
	old, ok := s.tokens[form.Get("refresh_token")]
	if !ok || old.Kind != "refresh" || old.Revoked || old.ClientID != c.ID {
		return nil, badRequest("invalid_grant", "Invalid refresh token.")
	}
	scope, ok := scopeWithin(form.Get("scope"), strings.Fields(old.Scope))
	if !ok {
		return nil, badRequest("invalid_scope", "")
	}
	// DOT's ROTATE_REFRESH_TOKEN without a grace period: the old pair is dead at once.
	old.revoke()
	return s.issue(c, old.User, "refresh_token", scope, true), nil
}

// revoke is RFC 7009 as DOT does it: 200 with an empty body whether or not the token was known.
func (s *Server) revoke(w http.ResponseWriter, r *http.Request) {
	form, oerr := postForm(r)
	if oerr == nil {
		oerr = required(form, "token")
	}
	if oerr == nil {
		s.mu.Lock()
		var c Client
		if c, oerr = s.formClient(form); oerr == nil {
			// token_type_hint only orders DOT's lookup; values are unique here. Another client's token is left alone (RFC 7009 section 2.1).
			if t, ok := s.tokens[form.Get("token")]; ok && t.ClientID == c.ID {
				t.revoke()
			}
		}
		s.mu.Unlock()
	}
	if oerr != nil {
		writeJSON(w, oerr.status, oerr)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// revoke revokes t, and the access token of a refresh token with it.
func (t *token) revoke() {
	t.Revoked = true
	if t.Kind == "refresh" && t.pair != nil {
		t.pair.Revoked = true
	}
}

// issue stores and returns a new access token, with a refresh token unless the grant has none.
func (s *Server) issue(c Client, user, grantType, scope string, withRefresh bool) *tokenResponse {
	info := TokenInfo{Kind: "access", ClientID: c.ID, User: user, Grant: grantType, Scope: scope}
	info.ExpiresAt = s.now().Add(s.tokenLifetime)
	access := s.store(info)
	resp := &tokenResponse{
		AccessToken: access.Value,
		ExpiresIn:   int64(s.tokenLifetime / time.Second),
		TokenType:   "Bearer",
		Scope:       scope,
	}
	if withRefresh {
		info.Kind, info.ExpiresAt = "refresh", time.Time{}
		refresh := s.store(info)
		access.pair, refresh.pair = refresh, access
		resp.RefreshToken = refresh.Value
	}
	return resp
}

func (s *Server) store(info TokenInfo) *token {
	info.Value = randomValue()
	t := &token{TokenInfo: info}
	s.tokens[t.Value] = t
	s.issued = append(s.issued, t)
	return t
}

// formClient authenticates a client by the client_id and client_secret form fields, as the
// contract's examples do; a public client sends no secret.
func (s *Server) formClient(form url.Values) (Client, *oauthError) {
	c, ok := s.clients[form.Get("client_id")]
	if !ok || !equal(form.Get("client_secret"), c.Secret) {
		return Client{}, errInvalidClient
	}
	return c, nil
}

// postForm returns the form body, refusing what oauthlib refuses: URL query parameters and
// repeated parameters.
func postForm(r *http.Request) (url.Values, *oauthError) {
	if r.URL.RawQuery != "" {
		return nil, badRequest("invalid_request", "URL query parameters are not allowed.")
	}
	if err := r.ParseForm(); err != nil {
		return nil, badRequest("invalid_request", "Malformed form body.")
	}
	for name, values := range r.PostForm {
		if len(values) > 1 {
			return nil, badRequest("invalid_request", "Duplicate "+name+" parameter.")
		}
	}
	return r.PostForm, nil
}

func required(form url.Values, names ...string) *oauthError {
	for _, name := range names {
		if form.Get(name) == "" {
			return badRequest("invalid_request", "Missing "+name+" parameter.")
		}
	}
	return nil
}

// scopeWithin returns the requested space separated scope if every scope in it is allowed; an
// empty request means all the allowed scopes.
func scopeWithin(requested string, allowed []string) (string, bool) {
	scopes := strings.Fields(requested)
	if len(scopes) == 0 {
		return strings.Join(allowed, " "), true
	}
	for _, scope := range scopes {
		if !slices.Contains(allowed, scope) {
			return "", false
		}
	}
	return strings.Join(scopes, " "), true
}

// writeJSON writes a token endpoint response, which must never be cached (RFC 6749 section 5.1).
func writeJSON(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}

// verifierPattern is RFC 7636 section 4.1: 43 to 128 unreserved characters.
var verifierPattern = regexp.MustCompile(`^[A-Za-z0-9._~-]{43,128}$`)

func s256(verifier string) string {
	sum := sha256.Sum256([]byte(verifier))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func equal(a, b string) bool { return subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1 }

const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// randomValue returns 30 random characters of [A-Za-z0-9], like the contract's tokens and codes.
func randomValue() string {
	value := make([]byte, 0, 30)
	var buf [48]byte // enough for 30 characters most of the time: 248 of 256 byte values are kept
	for len(value) < cap(value) {
		rand.Read(buf[:])
		for _, b := range buf {
			if int(b) < 256/len(alphabet)*len(alphabet) && len(value) < cap(value) { // rejection keeps the characters uniform
				value = append(value, alphabet[int(b)%len(alphabet)])
			}
		}
	}
	return string(value)
}
