package evenergy

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"
)

// simEvenergy is the simulation's ev.energy: an http.RoundTripper (no network, which synctest
// needs) that answers as django-oauth-toolkit does and keeps the ledger of every token it issued,
// which client minted it and what ended it. Every refresh rotates the refresh token and ends the
// previous access token; a refresh token used again is refused unless a grace period is on.
// Revocation is client-owned (RFC 7009 2.1): another client's token answers 200 and stays.
type simEvenergy struct {
	mu      sync.Mutex
	clients map[string][]string // client ID -> its valid secrets
	tokens  map[string]*simToken
	codes   map[string]*simCode
	issued  int
	grace   time.Duration // a used refresh token still answers its successor within it (off unless a seed turns it on)
	faults  simCallFaults
	down    time.Time // every call answers 503 until then
	flying  int       // calls being answered now

	lostRefreshes int // refreshes whose answer was lost after the work was done, without a grace period
	calls         int
	seed          uint64
	seen          map[string]int // calls so far by what they ask, for keyedRand
	current       string         // the call being answered, which names what it issues
}

// simCallFaults are the chances, in thousandths, that a call fails in each way.
type simCallFaults struct {
	serverError, rateLimited, hang, lostAnswer int
}

func (f simCallFaults) any() bool { return f != simCallFaults{} }

// simToken is one token ev.energy issued; the trace names it by id only, never by value.
type simToken struct {
	id        int
	client    string
	kind      string // "client_credentials", "user" (a grant's access or refresh token)
	refresh   bool
	pair      *simToken // the access token of a refresh token, and the other way round
	successor *simToken // the refresh token a refresh of this one issued
	expires   time.Time // access tokens only
	issuedAt  time.Time
	alive     bool
	endedBy   string // "refresh" or "revoke"
	endedAt   time.Time
	scope     string // as asked for, client-credentials tokens only
	external  bool   // handed to a user outside Vault: no promise of the engine covers it yet
	lost      bool   // its answer was lost: the engine cannot know it
}

func (t *simToken) live(now time.Time) bool {
	return t.alive && (t.refresh || now.Before(t.expires))
}

type simCode struct {
	client, challenge, redirect string
	expires                     time.Time
}

const simTokenLife = 36000 * time.Second

func newSimEvenergy(seed uint64) *simEvenergy {
	return &simEvenergy{seed: seed, seen: map[string]int{}, clients: map[string][]string{}, tokens: map[string]*simToken{}, codes: map[string]*simCode{}}
}

func (e *simEvenergy) setFaults(f simCallFaults) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.faults = f
}

func (e *simEvenergy) setDown(until time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.down = until
}

// issue makes a token; call it with mu held.
func (e *simEvenergy) issue(client, kind string, refresh bool) (string, *simToken) {
	e.issued++
	// Named by the call that issued it, not by the order of calls: goroutines answered at one
	// virtual instant run in any order, and a seed must replay.
	value := fmt.Sprintf("sim%d-%016x", e.issued, keyedRand(e.seed, e.current+"|"+kind+fmt.Sprint(refresh), e.seen).Uint64())
	t := &simToken{id: e.issued, client: client, kind: kind, refresh: refresh, issuedAt: time.Now(), alive: true}
	if !refresh {
		t.expires = time.Now().Add(simTokenLife)
	}
	e.tokens[value] = t
	return value, t
}

// issuePair makes a grant's access and refresh token; call it with mu held.
func (e *simEvenergy) issuePair(client string) (access, refresh string, a, r *simToken) {
	access, a = e.issue(client, "user", false)
	refresh, r = e.issue(client, "user", true)
	a.pair, r.pair = r, a
	return access, refresh, a, r
}

func (e *simEvenergy) end(t *simToken, by string) {
	if t != nil && t.alive {
		t.alive, t.endedBy, t.endedAt = false, by, time.Now()
	}
}

// outOfBand issues a grant to client as a user's authorization elsewhere would, for an import.
func (e *simEvenergy) outOfBand(client string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, refresh, a, r := e.issuePair(client)
	a.external, r.external = true, true
	return refresh
}

// authorize is the user's consent at ev.energy's authorize page: the code for the authorize URL.
func (e *simEvenergy) authorize(authorizeURL string) (code, state string, err error) {
	u, err := url.Parse(authorizeURL)
	if err != nil {
		return "", "", err
	}
	q := u.Query()
	if q.Get("code_challenge_method") != "S256" || q.Get("code_challenge") == "" {
		return "", "", errors.New("the authorize URL has no S256 PKCE challenge")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, known := e.clients[q.Get("client_id")]; !known {
		return "", "", errors.New("the authorize URL names an unknown client")
	}
	code = fmt.Sprintf("code-%016x", keyedRand(e.seed, "code", e.seen).Uint64())
	e.codes[code] = &simCode{client: q.Get("client_id"), challenge: q.Get("code_challenge"), redirect: q.Get("redirect_uri"), expires: time.Now().Add(60 * time.Second)}
	return code, q.Get("state"), nil
}

func (e *simEvenergy) RoundTrip(req *http.Request) (*http.Response, error) {
	body, _ := io.ReadAll(req.Body)
	req.Body.Close()
	form, _ := url.ParseQuery(string(body))
	e.mu.Lock()
	e.calls++
	e.flying++
	// The call's faults are drawn from what it asks, not from the order of calls (see issue).
	id, _, _ := req.BasicAuth()
	ask := strings.Join([]string{req.URL.Path, form.Get("grant_type"), form.Get("refresh_token"), form.Get("token"), id, form.Get("client_id"), form.Get("scope")}, "|")
	rng := keyedRand(e.seed, ask, e.seen)
	current := fmt.Sprintf("%s#%d", ask, e.seen[ask])
	latency := time.Duration(5+rng.IntN(150)) * time.Millisecond
	roll, kind := rng.IntN(1000), ""
	switch f := e.faults; {
	case time.Now().Before(e.down):
		kind = "down"
	case roll < f.serverError:
		kind = "5xx"
	case roll < f.serverError+f.rateLimited:
		kind = "429"
	case roll < f.serverError+f.rateLimited+f.hang:
		kind = "hang"
	case roll < f.serverError+f.rateLimited+f.hang+f.lostAnswer:
		kind = "lost"
	}
	retryAfter := []int{1, 2, 5, 30, 90, 21600}[rng.IntN(6)]
	hangUp := rng.IntN(2) == 0
	e.mu.Unlock()
	start := time.Now()
	defer func() {
		e.mu.Lock()
		e.flying--
		e.mu.Unlock()
		if pass, ok := req.Context().Value(simPassKey{}).(*simStall); ok {
			pass.call(time.Since(start))
		}
	}()
	if err := sleepUntil(req.Context(), time.Now().Add(latency)); err != nil {
		return nil, err
	}
	switch kind {
	case "down":
		return simAnswer(req, http.StatusServiceUnavailable, nil, nil), nil
	case "5xx":
		return simAnswer(req, http.StatusBadGateway, map[string]any{"detail": "upstream failed"}, nil), nil
	case "429":
		return simAnswer(req, http.StatusTooManyRequests, map[string]any{"detail": "slow down"}, http.Header{"Retry-After": {fmt.Sprint(retryAfter)}}), nil
	case "hang":
		<-req.Context().Done()
		return nil, req.Context().Err()
	}
	e.mu.Lock()
	e.current = current
	resp := e.answer(req, form, kind == "lost")
	e.mu.Unlock()
	if kind == "lost" { // the work is done; the answer never arrives
		if hangUp {
			<-req.Context().Done()
			return nil, req.Context().Err()
		}
		return nil, io.ErrUnexpectedEOF
	}
	return resp, nil
}

// keyedRand is the random source of one event, named by key and how many events of that key came
// before: events of different keys draw the same numbers in whatever order goroutines run them.
func keyedRand(seed uint64, key string, seen map[string]int) *rand.Rand {
	seen[key]++
	h := fnv.New64a()
	fmt.Fprintf(h, "%s#%d", key, seen[key])
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}

func simAnswer(req *http.Request, status int, body map[string]any, header http.Header) *http.Response {
	if header == nil {
		header = http.Header{}
	}
	var raw []byte
	if body != nil {
		raw, _ = json.Marshal(body)
		header.Set("Content-Type", "application/json")
	}
	return &http.Response{StatusCode: status, Status: http.StatusText(status), Header: header, Body: io.NopCloser(bytes.NewReader(raw)),
		ContentLength: int64(len(raw)), Request: req, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
}

func oauthError(req *http.Request, status int, code string) *http.Response {
	return simAnswer(req, status, map[string]any{"error": code, "error_description": code + " (simulated ev.energy)"}, nil)
}

// answer does the call's work; lost marks what it issues as unknowable to the engine. Call it with mu held.
func (e *simEvenergy) answer(req *http.Request, form url.Values, lost bool) *http.Response {
	switch req.URL.Path {
	case "/o/token":
	case "/o/revoke_token/":
		return e.revoke(req, form)
	case "/o/revoke_token":
		return simAnswer(req, http.StatusMethodNotAllowed, nil, nil)
	default:
		return simAnswer(req, http.StatusNotFound, nil, nil)
	}
	tokenAnswer := func(access, refresh string, scope string) *http.Response {
		body := map[string]any{"access_token": access, "token_type": "Bearer", "expires_in": int(simTokenLife.Seconds()), "scope": scope}
		if refresh != "" {
			body["refresh_token"] = refresh
		}
		return simAnswer(req, http.StatusOK, body, nil)
	}
	switch form.Get("grant_type") {
	case "client_credentials":
		id, secret, ok := req.BasicAuth()
		if !ok || !e.valid(id, secret) {
			return oauthError(req, http.StatusUnauthorized, "invalid_client")
		}
		access, a := e.issue(id, "client_credentials", false)
		a.lost, a.scope = lost, form.Get("scope")
		return tokenAnswer(access, "", form.Get("scope"))
	case "authorization_code":
		id := form.Get("client_id")
		if !e.valid(id, form.Get("client_secret")) {
			return oauthError(req, http.StatusUnauthorized, "invalid_client")
		}
		c := e.codes[form.Get("code")]
		delete(e.codes, form.Get("code"))
		sum := sha256.Sum256([]byte(form.Get("code_verifier")))
		if c == nil || c.client != id || time.Now().After(c.expires) || c.redirect != form.Get("redirect_uri") ||
			base64.RawURLEncoding.EncodeToString(sum[:]) != c.challenge {
			return oauthError(req, http.StatusBadRequest, "invalid_grant")
		}
		access, refresh, a, r := e.issuePair(id)
		a.lost, r.lost = lost, lost
		return tokenAnswer(access, refresh, "vehicle:read")
	case "refresh_token":
		id := form.Get("client_id")
		if !e.valid(id, form.Get("client_secret")) {
			return oauthError(req, http.StatusUnauthorized, "invalid_client")
		}
		old := e.tokens[form.Get("refresh_token")]
		if old == nil || !old.refresh || old.client != id {
			return oauthError(req, http.StatusBadRequest, "invalid_grant")
		}
		if !old.alive {
			if next := old.successor; e.grace > 0 && old.endedBy == "refresh" && time.Since(old.endedAt) < e.grace && next.alive {
				next.lost, next.pair.lost = lost && next.lost, lost && next.pair.lost
				return tokenAnswer(e.valueOf(next.pair), e.valueOf(next), "vehicle:read")
			}
			return oauthError(req, http.StatusBadRequest, "invalid_grant")
		}
		e.end(old, "refresh")
		e.end(old.pair, "refresh")
		access, refresh, a, r := e.issuePair(id)
		a.external, r.external = old.external && lost, old.external && lost
		old.successor = r
		a.lost, r.lost = lost, lost
		if lost && e.grace == 0 {
			e.lostRefreshes++
		}
		return tokenAnswer(access, refresh, "vehicle:read")
	}
	return oauthError(req, http.StatusBadRequest, "unsupported_grant_type")
}

// valueOf is the value of t; call it with mu held.
func (e *simEvenergy) valueOf(t *simToken) string {
	for v, x := range e.tokens {
		if x == t {
			return v
		}
	}
	return ""
}

// revoke is RFC 7009 as django-oauth-toolkit answers it: 200 with an empty body for a token the
// client does not own or that is unknown; revoking a refresh token ends its access token too.
func (e *simEvenergy) revoke(req *http.Request, form url.Values) *http.Response {
	id := form.Get("client_id")
	if !e.valid(id, form.Get("client_secret")) {
		return oauthError(req, http.StatusUnauthorized, "invalid_client")
	}
	if t := e.tokens[form.Get("token")]; t != nil && t.client == id {
		e.end(t, "revoke")
		if t.refresh {
			e.end(t.pair, "revoke")
		}
	}
	return simAnswer(req, http.StatusOK, nil, nil)
}

// busy reports whether a call is being answered now.
func (e *simEvenergy) busy() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.flying > 0
}

// valid reports whether secret is one of client's; call it with mu held.
func (e *simEvenergy) valid(client, secret string) bool {
	return secret != "" && slices.Contains(e.clients[client], secret)
}
