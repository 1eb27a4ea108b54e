package evenergy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unique"
	"unsafe"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/oauth2"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// refusingStorage refuses every write while refuse is set, as storage that lost its quorum does,
// and counts the writes asked of it.
type refusingStorage struct {
	logical.Storage
	refuse atomic.Bool
	puts   atomic.Int64
}

func (s *refusingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	s.puts.Add(1)
	if s.refuse.Load() {
		return errors.New("storage refuses writes")
	}
	return s.Storage.Put(ctx, e)
}

// TestRotatedGrantSurvivesRefusedWrites: a refresh whose rotated grant storage refuses keeps the
// grant, the only one ev.energy still accepts, in memory; readers get its token without another
// refresh, and the periodic pass stores it once storage accepts writes again. Nothing is revoked.
func TestRotatedGrantSurvivesRefusedWrites(t *testing.T) {
	s := &refusingStorage{Storage: &logical.InmemStorage{}}
	b, _, _ := newCountedBackend(t, s)
	sv := newUnitStandin(t, b, s)
	old, clock := connectDueUser(t, b, s, sv, "driver")
	s.refuse.Store(true)
	s.puts.Store(0)

	rotated, _, err := readUserToken(t, b, s, "driver")
	if err != nil || rotated == old.AccessToken || !sv.Active(rotated) {
		t.Fatalf("the refresh whose write storage refused gave no live token: %v", err)
	}
	if n := s.puts.Load(); n != int64(1+len(rotatedWritePauses)) {
		t.Fatalf("%d writes of the rotated grant, want %d", n, 1+len(rotatedWritePauses))
	}
	live := liveRefreshTokens(sv, "driver")
	if len(live) != 1 || sv.Active(old.RefreshToken) {
		t.Fatalf("want exactly the rotated refresh token live at ev.energy, got %d live", len(live))
	}
	// Served from memory: no second refresh, even after an invalidation of the key.
	b.InvalidateKey(t.Context(), userPrefix+"driver")
	calls := sv.TokenRequests()
	if again, _, err := readUserToken(t, b, s, "driver"); err != nil || again != rotated || sv.TokenRequests() != calls {
		t.Fatalf("the unsaved grant was not served from memory: %v", err)
	}
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err == nil || !strings.Contains(err.Error(), "storing the rotated token at users/driver") {
		t.Fatalf("a periodic pass while storage refuses: %v", err)
	}

	s.refuse.Store(false)
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err != nil {
		t.Fatal(err)
	}
	stored, err := getJSON[grant](t.Context(), s, userPrefix+"driver")
	if err != nil || stored.AccessToken != rotated || stored.RefreshToken != live[0] {
		t.Fatalf("the rotated grant was not stored once storage came back: %v", err)
	}
	if !sv.Active(live[0]) {
		t.Fatal("the rotated refresh token was revoked")
	}

	// With storage well, a refresh writes once: the rotated grant.
	clock.Set(stored.ExpiresAt.Add(-time.Minute))
	s.puts.Store(0)
	if tok, _, err := readUserToken(t, b, s, "driver"); err != nil || tok == rotated {
		t.Fatalf("second refresh: %v", err)
	}
	if n := s.puts.Load(); n != 1 {
		t.Fatalf("a refresh made %d storage writes, want 1", n)
	}
}

// liveRefreshTokens are the user's refresh tokens that ev.energy still accepts.
func liveRefreshTokens(sv *standin.Server, user string) []string {
	var live []string
	for _, info := range sv.Tokens() {
		if info.User == user && info.Kind == "refresh" && sv.Active(info.Value) {
			live = append(live, info.Value)
		}
	}
	return live
}

// TestRevokedGrantWritesItsStatusOnce: ev.energy's invalid_grant marks the grant revoked with one
// write, and no later read calls ev.energy or writes again.
func TestRevokedGrantWritesItsStatusOnce(t *testing.T) {
	s := &refusingStorage{Storage: &logical.InmemStorage{}}
	b, _, _ := newCountedBackend(t, s)
	sv := newUnitStandin(t, b, s)
	g, _ := connectDueUser(t, b, s, sv, "driver")
	if _, err := request(t, b, s, logical.UpdateOperation, "revoke", map[string]any{"token": g.RefreshToken}); err != nil {
		t.Fatal(err)
	}
	s.puts.Store(0)
	calls := sv.TokenRequests()
	for range 3 {
		_, _, err := readUserToken(t, b, s, "driver")
		var coded logical.HTTPCodedError
		if !errors.As(err, &coded) || coded.Code() != http.StatusBadRequest || !strings.Contains(err.Error(), "send the user through auth-url again") {
			t.Fatalf("a read of a revoked grant: %v", err)
		}
	}
	if n, puts := sv.TokenRequests()-calls, s.puts.Load(); n != 1 || puts != 1 {
		t.Fatalf("%d refresh calls and %d writes, want 1 and 1", n, puts)
	}
	if stored, _ := getJSON[grant](t.Context(), s, userPrefix+"driver"); stored.Status != grantRevoked || !strings.Contains(stored.LastError, "invalid_grant") {
		t.Fatalf("stored grant: status %s", stored.Status)
	}
}

// TestGrantWithoutClientAdoptsTheConfiguredOne: a grant stored before grants recorded their client
// records the configured client at its first refresh.
func TestGrantWithoutClientAdoptsTheConfiguredOne(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	seedGrants(t, b, s, sv, 1, time.Now().Add(5*time.Minute))
	g, _ := getJSON[grant](t.Context(), s, userPrefix+"u0")
	g.ClientID = ""
	if err := b.putGrant(t.Context(), s, "u0", g); err != nil {
		t.Fatal(err)
	}
	if _, _, err := readUserToken(t, b, s, "u0"); err != nil {
		t.Fatal(err)
	}
	if stored, _ := getJSON[grant](t.Context(), s, userPrefix+"u0"); stored.ClientID != testClientID || stored.AccessToken == "unknown" {
		t.Fatalf("after its first refresh the grant records client %q", stored.ClientID)
	}
}

// TestRefreshWindowCappedAtHalfTheTokenLife: a refresh_window at least as long as the tokens would
// make every read rotate the token and kill the one the previous reader got; it counts as half the
// token's life, which users/<user> shows.
func TestRefreshWindowCappedAtHalfTheTokenLife(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "20m"}); err != nil {
		t.Fatal(err)
	}
	sv.SetTokenLifetime(10 * time.Minute)
	g := connectUnitUser(t, b, s, sv, "driver")
	calls := sv.TokenRequests()
	for range 3 {
		tok, lease, err := readUserToken(t, b, s, "driver")
		if err != nil || tok != g.AccessToken || lease < 4*time.Minute || lease > 5*time.Minute {
			t.Fatalf("a read of a fresh 10-minute token under a 20-minute window: lease %v, same token %v, error %v", lease, tok == g.AccessToken, err)
		}
	}
	if n := sv.TokenRequests() - calls; n != 0 {
		t.Fatalf("reads of a fresh token sent %d refreshes", n)
	}
	resp, err := request(t, b, s, logical.ReadOperation, "users/driver", nil)
	if err != nil || resp.Data["refresh_window"] != int64(300) {
		t.Fatalf("users/driver shows refresh_window %v, want the effective 300 s: %v", resp.Data["refresh_window"], err)
	}

	// Past half its life the token is due; the next one, of 10 hours, gets the whole 20-minute window.
	sv.SetTokenLifetime(10 * time.Hour)
	useFakeClock(b, time.Now().Add(5*time.Minute))
	if tok, _, err := readUserToken(t, b, s, "driver"); err != nil || tok == g.AccessToken {
		t.Fatalf("a token past half its life was not refreshed: %v", err)
	}
	if resp, _ := request(t, b, s, logical.ReadOperation, "users/driver", nil); resp.Data["refresh_window"] != int64(1200) {
		t.Fatalf("users/driver shows refresh_window %v for a 10-hour token, want 1200", resp.Data["refresh_window"])
	}
}

// TestRefreshedGrantComesDueByTheWallClock: a refreshed grant's expiry holds no monotonic reading,
// as the stored one does not, so the refresh schedule (by wall clock) and unattended agree.
func TestRefreshedGrantComesDueByTheWallClock(t *testing.T) {
	g := grant{}.refreshed(&oauth2.Token{AccessToken: "access", Expiry: time.Now().Add(time.Hour)}, &config{})
	if g.ExpiresAt != g.ExpiresAt.Round(0) {
		t.Fatalf("the refreshed grant's expiry %v holds a monotonic reading", g.ExpiresAt)
	}
}

// TestGrantsShareTheirRepeatedStrings: grants read from storage, and refreshed ones, hold one copy
// of the strings most grants repeat, not one each.
func TestGrantsShareTheirRepeatedStrings(t *testing.T) {
	// A shared copy lives while a handle to it does: held, so that a collection cannot make another.
	handles := []unique.Handle[string]{unique.Make(testClientID), unique.Make("Bearer"), unique.Make("vehicle:read"), unique.Make(grantActive)}
	defer runtime.KeepAlive(handles)
	s := &logical.InmemStorage{}
	var read []*grant
	for _, user := range []string{"u0", "u1"} {
		stored := &grant{ClientID: testClientID, TokenType: "Bearer", Scope: "vehicle:read", Status: grantActive}
		if err := putJSON(t.Context(), s, userPrefix+user, stored); err != nil {
			t.Fatal(err)
		}
		g, err := getGrant(t.Context(), s, userPrefix+user)
		if err != nil {
			t.Fatal(err)
		}
		read = append(read, g)
	}
	tok := (&oauth2.Token{AccessToken: "access", TokenType: "bearer"}).WithExtra(map[string]any{"scope": strings.Clone("vehicle:read")})
	refreshed := grant{ClientID: testClientID}.refreshed(tok, &config{})
	for field, copies := range map[string][]string{
		"client_id":  {read[0].ClientID, read[1].ClientID},
		"token_type": {read[0].TokenType, read[1].TokenType, refreshed.TokenType},
		"scope":      {read[0].Scope, read[1].Scope, refreshed.Scope},
		"status":     {read[0].Status, read[1].Status},
	} {
		for _, c := range copies[1:] {
			if unsafe.StringData(c) != unsafe.StringData(copies[0]) {
				t.Errorf("the grants hold copies of their %s %q", field, c)
			}
		}
	}
}

// ledgerServer is an ev.energy token endpoint on the test's fake clock that keeps the ledger of
// the leases handed out for its access tokens: a refresh kills the access token of the refresh
// token it rotates (as django-oauth-toolkit does), and a kill before a lease of that token has
// ended, or a lease past the token's expiry or of a dead token, is a broken promise.
type ledgerServer struct {
	mu        sync.Mutex
	clock     *fakeClock
	life      time.Duration
	issued    int
	access    map[string]string    // live refresh token: its access token
	expiry    map[string]time.Time // live access token: when it expires on the fake clock
	leaseEnds map[string]time.Time // access token: the latest end of a lease handed out for it
	fault     func() (status int, retryAfter string)
	broken    []string
	refreshes int
}

func newLedgerServer(clock *fakeClock, life time.Duration) *ledgerServer {
	return &ledgerServer{clock: clock, life: life, access: map[string]string{}, expiry: map[string]time.Time{}, leaseEnds: map[string]time.Time{},
		fault: func() (int, string) { return 0, "" }}
}

// issue makes a new pair of tokens; call it with mu held.
func (l *ledgerServer) issue() map[string]any {
	l.issued++
	access, refresh := fmt.Sprintf("access-%d", l.issued), fmt.Sprintf("refresh-%d", l.issued)
	l.access[refresh] = access
	expiresAt := l.clock.Now().Add(l.life)
	l.expiry[access] = expiresAt
	// x/oauth2 adds expires_in to the wall clock; a second less keeps the engine's expiry before ours.
	expiresIn := int64(expiresAt.Sub(time.Now())/time.Second) - 1
	return map[string]any{"access_token": access, "refresh_token": refresh, "token_type": "Bearer", "expires_in": expiresIn, "scope": "vehicle:read"}
}

// grant issues a pair out of band, as a user's authorization elsewhere would, and returns its refresh token.
func (l *ledgerServer) grant() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.issue()["refresh_token"].(string)
}

// kill ends an access token; call it with mu held.
func (l *ledgerServer) kill(access, by string) {
	now := l.clock.Now()
	if end, leased := l.leaseEnds[access]; leased && end.After(now) {
		l.broken = append(l.broken, fmt.Sprintf("%s at %s killed %s, whose lease runs until %s", by, now.Format(time.TimeOnly+".000"), access, end.Format(time.TimeOnly+".000")))
	}
	delete(l.expiry, access)
}

// leased records a lease handed out for an access token at the clock's time.
func (l *ledgerServer) leased(access string, ttl time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clock.Now()
	expiry, live := l.expiry[access]
	end := now.Add(ttl)
	switch {
	case ttl <= 0:
		l.broken = append(l.broken, fmt.Sprintf("a lease of %v for %s", ttl, access))
	case !live:
		l.broken = append(l.broken, fmt.Sprintf("a lease at %s for %s, which is dead", now.Format(time.TimeOnly+".000"), access))
	case end.After(expiry):
		l.broken = append(l.broken, fmt.Sprintf("a lease of %s until %s, past its expiry %s", access, end.Format(time.TimeOnly), expiry.Format(time.TimeOnly)))
	}
	if end.After(l.leaseEnds[access]) {
		l.leaseEnds[access] = end
	}
}

func (l *ledgerServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	answer := func(status int, body any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(body)
	}
	switch r.URL.Path {
	case "/o/revoke_token/":
		token := r.Form.Get("token")
		if access, ok := l.access[token]; ok {
			delete(l.access, token)
			token = access
		}
		l.kill(token, "a revocation")
		w.WriteHeader(http.StatusOK)
		return
	case "/o/token":
	default:
		http.NotFound(w, r)
		return
	}
	if status, retryAfter := l.fault(); status != 0 {
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		answer(status, map[string]string{"detail": "failing on purpose"})
		return
	}
	access, live := l.access[r.Form.Get("refresh_token")]
	if r.Form.Get("grant_type") != "refresh_token" || !live {
		answer(http.StatusBadRequest, map[string]string{"error": "invalid_grant"})
		return
	}
	delete(l.access, r.Form.Get("refresh_token"))
	l.refreshes++
	l.kill(access, "a refresh")
	answer(http.StatusOK, l.issue())
}

// TestNoRefreshKillsALeasedToken: with a fake clock, random reads of several users' tokens,
// refresh_window writes, ev.energy failing some refreshes (500, 429 with short, huge and
// HTTP-date Retry-After), re-authorizations, periodic passes, clock moves (often to just before a
// promised lease end) and restarts on the same storage: no refresh or revocation kills an access
// token before every lease handed out for it has ended, and no lease outlives its token.
// It stays beside the simulation (simulation_test.go), whose invariant (b) checks the same promise
// on virtual time: this one runs the engine's real HTTP client against a real HTTP server
// (httptest, which a synctest bubble cannot host) and checks each queued replaced grant's
// not_before against the end of every lease handed out for it.
func TestNoRefreshKillsALeasedToken(t *testing.T) {
	const steps, life = 4000, time.Hour
	rng := rand.New(rand.NewPCG(18, 18))
	faults := rand.New(rand.NewPCG(18, 19)) // used by the server, under its lock
	b, s := newUnitBackend(t)
	clock := useFakeClock(b, time.Now())
	ledger := newLedgerServer(clock, life)
	outage := false
	ledger.fault = func() (int, string) {
		if !outage || faults.IntN(4) == 0 {
			return 0, ""
		}
		switch faults.IntN(5) {
		case 0:
			return http.StatusTooManyRequests, "21600"
		case 1:
			return http.StatusTooManyRequests, time.Now().Add(6 * time.Hour).UTC().Format(http.TimeFormat)
		case 2:
			return http.StatusTooManyRequests, fmt.Sprint(1 + faults.IntN(90))
		default:
			return http.StatusInternalServerError, ""
		}
	}
	server := httptest.NewServer(ledger)
	t.Cleanup(server.Close)
	if _, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret,
		"base_url": server.URL, "request_timeout": "1s", "refresh_window": "10m"}); err != nil {
		t.Fatal(err)
	}
	users := []string{"u0", "u1", "u2"}
	for _, user := range users {
		if _, err := request(t, b, s, logical.UpdateOperation, "users/"+user, map[string]any{"refresh_token": ledger.grant()}); err != nil {
			t.Fatal(err)
		}
	}
	// latest is the end of the latest lease handed out for each user's token: where a refresh
	// that breaks a promise would come.
	latest := map[string]time.Time{}
	reads, failed, restarts, reauthorized := 0, 0, 0, 0
	for step := range steps {
		user := users[rng.IntN(len(users))]
		switch op := rng.IntN(20); {
		case op < 8: // a reader
			resp, err := request(t, b, s, logical.ReadOperation, "users/"+user+"/token", nil)
			reads++
			if err != nil || resp.IsError() {
				failed++
				continue
			}
			ledger.leased(resp.Data["access_token"].(string), resp.Secret.TTL)
			latest[user] = clock.Now().Add(resp.Secret.TTL)
		case op < 11: // the clock stands just before the end of the latest lease, or just after it
			if at := latest[user].Add(time.Duration(rng.Int64N(int64(4*time.Second))) - 3*time.Second); at.After(clock.Now()) {
				clock.Set(at)
			}
		case op < 13:
			clock.Advance(time.Duration(rng.Int64N(int64(20 * time.Minute))))
		case op == 13:
			window := []string{"1m", "5m", "10m", "25m", "59m"}[rng.IntN(5)]
			if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": window}); err != nil {
				t.Fatal(err)
			}
		case op == 14:
			_ = b.periodic(t.Context(), &logical.Request{Storage: s}) // failures are expected during an outage
		case op == 15:
			outage = !outage
		case op == 16: // the user connects again
			if _, err := request(t, b, s, logical.UpdateOperation, "users/"+user, map[string]any{"refresh_token": ledger.grant()}); err == nil {
				reauthorized++
			}
		case op == 17 && rng.IntN(4) == 0: // a restart, or another node taking over, on the same storage
			config := logical.TestBackendConfig()
			config.StorageView = s
			next, err := Factory(t.Context(), config)
			if err != nil {
				t.Fatal(err)
			}
			b = next.(*backend)
			clock.drive(b)
			if err := b.Initialize(t.Context(), &logical.InitializationRequest{Storage: s}); err != nil {
				t.Fatal(err)
			}
			<-b.grantsLoaded
			restarts++
		}
		ledger.mu.Lock()
		broken := ledger.broken
		ledger.mu.Unlock()
		if len(broken) > 0 {
			t.Fatalf("step %d: %s", step, strings.Join(broken, "; "))
		}
	}
	t.Logf("%d reads (%d failed), %d refreshes, %d re-authorizations, %d restarts", reads, failed, ledger.refreshes, reauthorized, restarts)
	if ledger.refreshes < steps/100 || reads-failed < steps/4 {
		t.Fatalf("the run exercised too little: %d refreshes, %d leases", ledger.refreshes, reads-failed)
	}
	for _, rec := range pendingRevocations(t, s) {
		if end := ledger.leaseEnds[rec.AccessToken]; rec.Reason == reasonReplacedGrant && rec.NotBefore.Before(end) {
			t.Fatalf("a replaced grant is queued for revocation at %v, before the end of its lease %v", rec.NotBefore, end)
		}
	}
}

// TestReadNearTheRefreshPointWaitsForIt: a reader 3 s before the grant's refresh point gets a lease
// ending there; a reader 1 s before it waits for the point, and the refresh reaches ev.energy then,
// not while the first reader's lease lives, and gives it the fresh token.
func TestReadNearTheRefreshPointWaitsForIt(t *testing.T) {
	b, s := newUnitBackend(t)
	clock := useFakeClock(b, time.Now())
	sv, attempts := clockedCalls(t, b, s, clock)
	g := connectUnitUser(t, b, s, sv, "driver")
	at := storedRefreshAt(t, s, "driver")
	clock.Set(at.Add(-3 * time.Second))
	if tok, lease, err := readUserToken(t, b, s, "driver"); err != nil || tok != g.AccessToken || lease != 3*time.Second {
		t.Fatalf("3 s before the refresh point: lease %v, current token %v, error %v", lease, tok == g.AccessToken, err)
	}
	clock.Set(at.Add(-time.Second))
	before := len(attempts())
	tok, _, err := readUserToken(t, b, s, "driver")
	if err != nil || tok == g.AccessToken || !sv.Active(tok) {
		t.Fatalf("1 s before the refresh point: fresh token %v, error %v", tok != g.AccessToken, err)
	}
	if sent := attempts()[before:]; len(sent) != 1 || sent[0].Before(at) {
		t.Fatalf("%d refreshes, the first %v before the refresh point; want one at it", len(sent), at.Sub(sent[0]))
	}
}

// TestReadWaitingForTheRefreshPointEndsWithItsCaller: on the wall clock, a read within readAhead of
// the refresh point whose caller has gone answers at once with the caller's error, and sends nothing.
func TestReadWaitingForTheRefreshPointEndsWithItsCaller(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g := connectUnitUser(t, b, s, sv, "driver")
	g.RefreshAt = time.Now().Add(time.Minute) // a minute's wait, were it not for the caller
	if err := b.putGrant(t.Context(), s, "driver", g); err != nil {
		t.Fatal(err)
	}
	b.tokens.refreshes.now = func() time.Time { return time.Now().Add(time.Minute - time.Second) }
	calls := sv.TokenRequests()
	ctx, leave := context.WithCancel(t.Context())
	leave()
	start := time.Now()
	_, err := b.HandleRequest(ctx, &logical.Request{Operation: logical.ReadOperation, Path: "users/driver/token", Storage: s})
	if !errors.Is(err, context.Canceled) || time.Since(start) > 5*time.Second || sv.TokenRequests() != calls {
		t.Fatalf("a read whose caller left: %v after %v, %d refreshes", err, time.Since(start), sv.TokenRequests()-calls)
	}
}

// TestRefreshWindowWriteMovesNoPromisedPoint: a refresh_window write applies to tokens issued after
// it: the current token's lease still ends at its refresh point, no read or pass refreshes it
// before, and its successor gets the new window.
func TestRefreshWindowWriteMovesNoPromisedPoint(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g := connectUnitUser(t, b, s, sv, "driver")
	clock := useFakeClock(b, time.Now())
	_, lease, err := readUserToken(t, b, s, "driver")
	if err != nil {
		t.Fatal(err)
	}
	promised := clock.Now().Add(lease)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "9h"}); err != nil {
		t.Fatal(err)
	}
	calls := sv.TokenRequests()
	clock.Set(promised.Add(-readAhead - time.Second))
	runPeriodic(t, b, s)
	tok, lease, err := readUserToken(t, b, s, "driver")
	if err != nil || tok != g.AccessToken || clock.Now().Add(lease).After(promised) || sv.TokenRequests() != calls {
		t.Fatalf("after a 9-hour window was written: %d refreshes, a lease of %v, error %v", sv.TokenRequests()-calls, lease, err)
	}
	clock.Set(promised)
	if tok, lease, err := readUserToken(t, b, s, "driver"); err != nil || tok == g.AccessToken || lease > time.Hour+time.Minute {
		t.Fatalf("at the refresh point: a lease of %v for a fresh token (%v) under the 9-hour window of 10-hour tokens: %v", lease, tok != g.AccessToken, err)
	}
}

// TestReplacedGrantIsRevokedAtItsStoredRefreshPoint: a user who connects again after a
// refresh_window write has the old grant queued for revocation at its stored refresh point, where
// its leases end, not where the new window would put it.
func TestReplacedGrantIsRevokedAtItsStoredRefreshPoint(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	connectUnitUser(t, b, s, sv, "driver")
	at := storedRefreshAt(t, s, "driver")
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "5h"}); err != nil {
		t.Fatal(err)
	}
	connectUnitUser(t, b, s, sv, "driver")
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].Reason != reasonReplacedGrant || !queued[0].NotBefore.Equal(at) {
		t.Fatalf("want the replaced grant queued until its refresh point %v, got %+v", at, queued)
	}
}

// TestNodeTakingOverDuringBackoffKeepsTheNextAttempt: a failed refresh's next attempt is stored, so
// a node that takes over (a new backend on the same storage) hands out no lease past it, and
// neither its reads nor its pass refresh before it.
func TestNodeTakingOverDuringBackoffKeepsTheNextAttempt(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g, clock := connectDueUser(t, b, s, sv, "driver")
	sv.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: 40 * time.Second, Count: 1})
	if _, lease, err := readUserToken(t, b, s, "driver"); err != nil || lease != 40*time.Second {
		t.Fatalf("during backoff: a lease of %v, error %v; want 40 s", lease, err)
	}
	retryAt := clock.Now().Add(40 * time.Second)

	next, _, _ := newCountedBackend(t, s)
	clock.drive(next)
	if err := next.Initialize(t.Context(), &logical.InitializationRequest{Storage: s}); err != nil {
		t.Fatal(err)
	}
	<-next.grantsLoaded
	calls := sv.TokenRequests()
	clock.Advance(20 * time.Second)
	runPeriodic(t, next, s)
	tok, lease, err := readUserToken(t, next, s, "driver")
	if err != nil || tok != g.AccessToken || !clock.Now().Add(lease).Equal(retryAt) || sv.TokenRequests() != calls {
		t.Fatalf("on the node taking over, 20 s later: a lease of %v, %d refreshes, error %v; want the current token until the next attempt", lease, sv.TokenRequests()-calls, err)
	}
	if resp, err := request(t, next, s, logical.ReadOperation, "users/driver", nil); err != nil || resp.Data["refresh_at"] != retryAt.UTC().Format(time.RFC3339) {
		t.Fatalf("users/driver shows refresh_at %v, want the next attempt %v: %v", resp.Data["refresh_at"], retryAt.UTC().Format(time.RFC3339), err)
	}
	clock.Set(retryAt)
	runPeriodic(t, next, s)
	if sv.TokenRequests() != calls+1 {
		t.Fatalf("at the next attempt the node's pass sent %d refreshes, want 1", sv.TokenRequests()-calls)
	}
}

// userInBucket is a user name whose grant's lock, as locksutil's 256 shared buckets placed it,
// falls in the bucket of key.
func userInBucket(t *testing.T, key, prefix string) string {
	t.Helper()
	for i := range 100000 {
		if user := fmt.Sprintf("%s-%d", prefix, i); locksutil.LockIndexForKey(userPrefix+user) == locksutil.LockIndexForKey(key) {
			return user
		}
	}
	t.Fatalf("no user shares the lock bucket of %s", key)
	return ""
}

func TestHungRefreshDelaysOnlyItsUser(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)

	// A link in flight, whose state's lock the hung user and the other user shared with locksutil.
	resp := newLink(t, b, s, "newcomer")
	state := resp.Data["state"].(string)
	redirect, err := sv.Authorize(t.Context(), resp.Data["authorize_url"].(string), "newcomer", true)
	if err != nil {
		t.Fatal(err)
	}
	hung := userInBucket(t, authRequestPrefix+state, "hung")
	other := userInBucket(t, userPrefix+hung, "other")

	sv.SetTokenLifetime(5 * time.Minute)
	hungGrant := connectUnitUser(t, b, s, sv, hung)
	connectUnitUser(t, b, s, sv, other)
	useFakeClock(b, time.Now().Add(3*time.Minute)) // both are due

	sv.HangRefreshToken(hungGrant.RefreshToken)
	hungRead := make(chan error, 1)
	go func() {
		_, _, err := readUserToken(t, b, s, hung)
		hungRead <- err
	}()
	t.Cleanup(func() {
		sv.SetFault(standin.Fault{}) // ends the hang, once the others have completed or not
		select {
		case <-hungRead:
		case <-time.After(60 * time.Second):
			t.Error("the hung user's read did not end once released")
		}
	})
	eventually(t, 5*time.Second, "the hung user's refresh is held", func() bool { return sv.Held() == 1 })

	otherRead := make(chan error, 1)
	go func() {
		_, _, err := readUserToken(t, b, s, other)
		otherRead <- err
	}()
	callback := make(chan *logical.Response, 1)
	go func() {
		resp, _ := request(t, b, s, logical.ReadOperation, "callback", map[string]any{"state": state, "code": redirect.Query().Get("code")})
		callback <- resp
	}()
	deadline := time.After(5 * time.Second)
	for waiting := []string{"the other due user's read", "the callback"}; len(waiting) > 0; {
		select {
		case err := <-otherRead:
			if err != nil {
				t.Errorf("the other due user's read: %v", err)
			}
			waiting = slices.DeleteFunc(waiting, func(w string) bool { return strings.Contains(w, "read") })
		case resp := <-callback:
			if resp == nil || resp.Data[logical.HTTPStatusCode] != http.StatusOK {
				t.Errorf("callback answered %v", resp)
			}
			waiting = slices.DeleteFunc(waiting, func(w string) bool { return strings.Contains(w, "callback") })
		case <-deadline:
			t.Fatalf("a hung refresh held up %v for 5 s", waiting)
		}
	}
	if sv.Held() != 1 {
		t.Fatal("the hung refresh ended before the others completed")
	}
}

// TestStepDownSettlesUnsavedGrants: a grant only memory holds (storage refused its rotated tokens)
// is stored as the node steps down, when storage takes it; when storage still refuses, as Raft does
// once the node lost its quorum, its tokens are revoked at ev.energy as the client that minted them.
func TestStepDownSettlesUnsavedGrants(t *testing.T) {
	for _, refused := range []bool{false, true} {
		s := &refusingStorage{Storage: &logical.InmemStorage{}}
		b, _, _ := newCountedBackend(t, s)
		sv := newUnitStandin(t, b, s)
		connectDueUser(t, b, s, sv, "driver")
		s.refuse.Store(true)
		rotated, _, err := readUserToken(t, b, s, "driver")
		if err != nil {
			t.Fatal(err)
		}
		s.refuse.Store(refused)
		b.Cleanup(t.Context())
		stored, err := getJSON[grant](t.Context(), s, userPrefix+"driver")
		if err != nil {
			t.Fatal(err)
		}
		switch live := liveRefreshTokens(sv, "driver"); {
		case !refused && (stored.AccessToken != rotated || len(live) != 1 || live[0] != stored.RefreshToken):
			t.Fatal("the step-down did not store the unsaved grant while storage took writes")
		case refused && (len(live) != 0 || sv.Active(rotated)):
			t.Fatalf("the step-down left the unsaved grant's tokens alive at ev.energy (%d refresh tokens) with storage refusing", len(live))
		}
	}
}

// TestLostRefreshAnswerEndsTheGrantAndSaysWhy: a refresh whose answer is lost after ev.energy rotated
// the grant (a hang-up) is tried again at once; ev.energy then refuses the dead refresh token, with no
// grace period, so the grant ends saying why, is counted, and no reader gets the old access token,
// which the rotation ended. An answer lost before ev.energy did the work costs only the retry.
func TestLostRefreshAnswerEndsTheGrantAndSaysWhy(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	connectDueUser(t, b, s, sv, "driver")
	sv.SetFault(standin.Fault{Kind: standin.FaultHangUp, Count: 1})
	if tok, _, err := readUserToken(t, b, s, "driver"); err != nil || !sv.Active(tok) {
		t.Fatalf("an answer lost before ev.energy did the work: the retry gave no live token: %v", err)
	}

	connectDueUser(t, b, s, sv, "driver")
	sv.SetFault(standin.Fault{Kind: standin.FaultIssueThenHangUp, Count: 1})
	if tok, lease, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatalf("a reader got a lease of %v on a token ev.energy ended (alive: %v)", lease, sv.Active(tok))
	}
	g := storedGrantOf(t, s, "driver")
	if g.Status != grantRevoked || !strings.Contains(g.LastError, "answer") || !strings.Contains(g.LastError, "lost") {
		t.Fatalf("the grant whose refresh answer was lost: status %s, last error %q; want revoked, saying the answer was lost", g.Status, g.LastError)
	}
	var counted dto.Metric
	if err := b.metrics.refreshes.WithLabelValues(refreshLost).Write(&counted); err != nil || counted.GetCounter().GetValue() != 1 {
		t.Fatalf("%v lost refresh answers counted, want 1: %v", counted.GetCounter().GetValue(), err)
	}
}

// storedGrantOf is the user's grant as storage holds it.
func storedGrantOf(t *testing.T, s logical.Storage, user string) *grant {
	t.Helper()
	g, err := getJSON[grant](t.Context(), s, userPrefix+user)
	if err != nil || g == nil {
		t.Fatalf("the grant of %s: %v", user, err)
	}
	return g
}

// TestPassingFailureAfterALostAnswerLeasesNoDeadToken: why: once a refresh's answer was lost and the
// retry settled nothing, a later passing failure (ev.energy answers 500) must not move the point and
// lease the old access token, which ev.energy may have ended (here it did).
func TestPassingFailureAfterALostAnswerLeasesNoDeadToken(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	g, clock := connectDueUser(t, b, s, sv, "driver")
	sv.SetFault(standin.Fault{Kind: standin.FaultIssueThenHangUp, Count: 2}) // the refresh and its retry: both answers lost
	if _, _, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatal("a read whose refresh and retry lost their answers got a token")
	}
	if sv.Active(g.AccessToken) {
		t.Fatal("setup: ev.energy did not rotate the grant on the lost refresh")
	}
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	clock.Advance(time.Minute) // past the backoff
	if tok, lease, err := readUserToken(t, b, s, "driver"); err == nil && !sv.Active(tok) {
		t.Fatalf("a reader got a lease of %v on the access token ev.energy ended with the lost refresh", lease)
	}
}

// gatedRefresh holds refresh requests (/o/token without Basic auth) while gating is on, until release.
type gatedRefresh struct {
	*standin.Server
	gating  atomic.Bool
	arrived chan struct{}
	release chan struct{}
}

func (g *gatedRefresh) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if g.gating.Load() && r.URL.Path == "/o/token" && r.Header.Get("Authorization") == "" {
		g.arrived <- struct{}{}
		<-g.release
	}
	g.Server.ServeHTTP(w, r)
}

// TestStepDownSettlesAReadersRefreshInFlight: why: a reader's refresh sent before the step-down and
// answered after it, whose rotated grant storage then refuses, must be stored or revoked too, not
// left live at ev.energy with storage holding the dead refresh token.
func TestStepDownSettlesAReadersRefreshInFlight(t *testing.T) {
	s := &refusingStorage{Storage: &logical.InmemStorage{}}
	b, _, _ := newCountedBackend(t, s)
	gate := &gatedRefresh{Server: newTestStandin(), arrived: make(chan struct{}, 1), release: make(chan struct{})}
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(gate.release) }) }
	unitConfig(t, b, s, gate)
	t.Cleanup(release) // before the server closes, which waits for held requests
	connectDueUser(t, b, s, gate.Server, "driver")
	gate.gating.Store(true)
	read := make(chan error, 1)
	go func() { _, _, err := readUserToken(t, b, s, "driver"); read <- err }()
	<-gate.arrived
	s.refuse.Store(true) // the node loses its quorum and steps down
	cleaned := make(chan struct{})
	go func() { b.Cleanup(t.Context()); close(cleaned) }()
	eventually(t, time.Minute, "the step-down waits for the reader's refresh, or ends", func() bool {
		b.tokens.refreshes.mu.Lock()
		defer b.tokens.refreshes.mu.Unlock()
		return b.tokens.refreshes.landing || isClosed(cleaned)
	})
	if isClosed(cleaned) {
		t.Fatal("the step-down ended with a reader's refresh in flight: what it rotates, storage refusing, is neither stored nor revoked")
	}
	release()
	<-cleaned
	<-read
	stored := storedGrantOf(t, s, "driver")
	for _, live := range liveRefreshTokens(gate.Server, "driver") {
		if live != stored.RefreshToken {
			t.Fatal("a refresh token rotated by a reader's refresh in flight at the step-down is neither stored nor revoked")
		}
	}
}

// isClosed reports whether ch is closed.
func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// TestLostAnswerThenUnsettledRetryThenRefusalSaysWhy: why: a lost answer whose retry also failed
// without word, then refused at the next attempt, must end the grant saying the answer was lost,
// counted as lost, not as a plain invalid_grant.
func TestLostAnswerThenUnsettledRetryThenRefusalSaysWhy(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	_, clock := connectDueUser(t, b, s, sv, "driver")
	sv.SetFault(standin.Fault{Kind: standin.FaultIssueThenHangUp, Count: 2}) // the refresh and its retry: both answers lost
	if _, _, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatal("a read whose refresh and retry lost their answers got a token")
	}
	clock.Advance(time.Minute) // past the backoff; ev.energy answers again, and refuses the dead refresh token
	if _, _, err := readUserToken(t, b, s, "driver"); err == nil {
		t.Fatal("a read of a grant ev.energy refuses got a token")
	}
	g := storedGrantOf(t, s, "driver")
	if g.Status != grantRevoked || !strings.Contains(g.LastError, "answer to a refresh was lost") {
		t.Fatalf("status %s, last error %q; want revoked, saying the answer was lost", g.Status, g.LastError)
	}
	var counted dto.Metric
	if err := b.metrics.refreshes.WithLabelValues(refreshLost).Write(&counted); err != nil || counted.GetCounter().GetValue() != 1 {
		t.Fatalf("%v lost refresh answers counted, want 1: %v", counted.GetCounter().GetValue(), err)
	}
}

// gatewayAfterWork passes token requests to ev.energy, which does the work, and while failing is
// set answers the client 504 in its place, as a proxy in front of ev.energy that timed out would.
type gatewayAfterWork struct {
	*standin.Server
	failing atomic.Bool
}

func (g *gatewayAfterWork) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !g.failing.Load() || r.URL.Path != "/o/token" {
		g.Server.ServeHTTP(w, r)
		return
	}
	g.Server.ServeHTTP(httptest.NewRecorder(), r)
	w.Header().Set("Content-Type", "text/html")
	w.WriteHeader(http.StatusGatewayTimeout)
	_, _ = w.Write([]byte("<html><body><h1>504 Gateway Time-out</h1></body></html>"))
}

// TestGatewayTimeoutAfterTheRotationLeasesNoDeadToken: why: a 504 from a proxy may come after
// ev.energy rotated the grant, so its outcome is unknown as a hang-up's is: no reader may get a
// lease on the old access token, which the rotation ended.
func TestGatewayTimeoutAfterTheRotationLeasesNoDeadToken(t *testing.T) {
	b, s := newUnitBackend(t)
	gate := &gatewayAfterWork{Server: newTestStandin()}
	unitConfig(t, b, s, gate)
	connectDueUser(t, b, s, gate.Server, "driver")
	gate.failing.Store(true)
	for range 4 {
		if tok, lease, err := readUserToken(t, b, s, "driver"); err == nil && !gate.Active(tok) {
			t.Fatalf("a reader got a lease of %v on the access token ev.energy ended behind a 504", lease)
		}
	}
}
