package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unique"
	"unsafe"

	"github.com/hashicorp/vault/sdk/helper/locksutil"
	"github.com/hashicorp/vault/sdk/logical"
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
	if err := b.periodic(t.Context(), &logical.Request{Storage: s}); err == nil || !strings.Contains(err.Error(), "storing the rotated grant of user driver") {
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
	g := grant{}.refreshed(&oauth2.Token{AccessToken: "access", Expiry: time.Now().Add(time.Hour)})
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
		g, err := getGrant(t.Context(), s, user)
		if err != nil {
			t.Fatal(err)
		}
		read = append(read, g)
	}
	tok := (&oauth2.Token{AccessToken: "access", TokenType: "bearer"}).WithExtra(map[string]any{"scope": strings.Clone("vehicle:read")})
	refreshed := grant{ClientID: testClientID}.refreshed(tok)
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
