package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// writeSharedRole writes roles/<name> as a shared role with scopes.
func writeSharedRole(t *testing.T, b *backend, s logical.Storage, name string, scopes ...string) {
	t.Helper()
	data := map[string]any{"shared": true}
	if len(scopes) > 0 {
		data["scopes"] = scopes
	}
	resp, err := request(t, b, s, logical.CreateOperation, rolePrefix+name, data)
	if err != nil || resp.IsError() {
		t.Fatalf("role write: %v %v", err, resp)
	}
}

// storedShared is the role's shared token as storage holds it.
func storedShared(t *testing.T, s logical.Storage, name string) *grant {
	t.Helper()
	st, err := getJSON[grant](t.Context(), s, sharedTokenPrefix+name)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// readShared reads token/<role> and returns its token.
func readShared(t *testing.T, b *backend, s logical.Storage, name string) string {
	t.Helper()
	resp, err := request(t, b, s, logical.ReadOperation, "token/"+name, nil)
	if err != nil || resp.IsError() || resp.Secret == nil {
		t.Errorf("token/%s: %v %v", name, err, resp)
		return ""
	}
	return resp.Data["access_token"].(string)
}

// readSharedConcurrently runs 1,000 reads, 20 from each of 50 readers at once; read(reader) returns
// the token a read got, or what is wrong with it. It fails the test on any problem, and returns how
// many reads got each token.
func readSharedConcurrently(t *testing.T, read func(reader int) (token, problem string)) map[string]int {
	t.Helper()
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		tokens = map[string]int{}
		bad    []string
	)
	for reader := range 50 {
		wg.Go(func() {
			for range 20 {
				token, problem := read(reader)
				mu.Lock()
				if problem != "" {
					bad = append(bad, problem)
				} else {
					tokens[token]++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(bad) > 0 {
		t.Fatalf("%d bad reads, the first: %s", len(bad), bad[0])
	}
	return tokens
}

func TestSharedRoleMintsOnceForConcurrentColdReaders(t *testing.T) {
	b, s, _ := newCountedBackend(t, &logical.InmemStorage{})
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	clock := useFakeClock(b, time.Now())
	before := sv.TokenRequests()
	tokens := readSharedConcurrently(t, func(int) (string, string) {
		resp, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil)
		switch st := storedShared(t, s, "fleet"); {
		case err != nil || resp.IsError() || resp.Secret == nil:
			return "", "a read failed"
		case resp.Secret.Renewable:
			return "", "a renewable lease"
		case clock.Now().Add(resp.Secret.TTL).After(st.RefreshAt) || resp.Secret.MaxTTL > resp.Secret.TTL:
			return "", "a lease past the replacement time"
		}
		return resp.Data["access_token"].(string), ""
	})
	if n := sv.TokenRequests() - before; n != 1 || len(tokens) != 1 {
		t.Fatalf("1,000 reads from 50 cold readers sent %d token requests and got %d tokens, want 1 and 1", n, len(tokens))
	}
}

func TestSharedTokenReadIsACachedRead(t *testing.T) {
	b, s, sys := newCountedBackend(t, &logical.InmemStorage{})
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")
	s.calls.Store(0)
	sys.calls.Store(0)
	requests := sv.TokenRequests()
	for range 100 {
		if tok := readShared(t, b, s, "fleet"); tok != first {
			t.Fatal("a reader got another token than the stored one")
		}
	}
	if s.calls.Load() != 0 || sys.calls.Load() != 0 || sv.TokenRequests() != requests {
		t.Fatalf("100 reads of a stored shared token made %d storage calls, %d calls to Vault and %d token requests, want none",
			s.calls.Load(), sys.calls.Load(), sv.TokenRequests()-requests)
	}
}

func TestSharedTokenReplacedByThePassWithNoReader(t *testing.T) {
	t.Parallel()
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	sv.SetTokenLifetime(12 * time.Second)
	if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"refresh_window": "6s"}); err != nil {
		t.Fatal(err)
	}
	writeSharedRole(t, b, s, "fleet")
	old := readShared(t, b, s, "fleet")
	point := storedShared(t, s, "fleet").RefreshAt
	useFakeClock(b, point) // the replacement time, with no reader
	sv.SetTokenLifetime(10 * time.Hour)

	runPeriodic(t, b, s)
	next := storedShared(t, s, "fleet")
	if next == nil || next.AccessToken == old {
		t.Fatal("the pass did not replace a shared token at its replacement time")
	}
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].AccessToken != old || queued[0].ClientID != testClientID || !queued[0].NotBefore.Equal(point) || queued[0].Reason != reasonReplacedShared {
		t.Fatalf("want the old token queued as %s until %v, got %s", testClientID, point, describeRecords(queued))
	}
	if time.Now().Before(point) && !sv.Active(old) {
		t.Fatal("the replaced token was revoked while leases handed out for it still run")
	}
	eventually(t, 30*time.Second, "the replaced token to be revoked once its leases ended", func() bool {
		runPeriodic(t, b, s)
		return !sv.Active(old)
	})
	if tok, _ := sv.Token(old); !tok.Revoked || time.Now().Before(point) {
		t.Fatalf("the old token ended otherwise than by its revocation after %v (revoked: %v)", point, tok.Revoked)
	}
	if got := readShared(t, b, s, "fleet"); got != next.AccessToken {
		t.Fatal("a reader after the replacement did not get the new token")
	}
}

func TestSharedTokenReplacementOutlivesAnOutage(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	writeSharedRole(t, b, s, "fleet")
	old := readShared(t, b, s, "fleet")
	// The token came due 12 minutes ago; ev.energy is down from then on, for 11 minutes.
	st := storedShared(t, s, "fleet")
	start := time.Now()
	due := *st
	due.RefreshAt = start.Add(-12 * time.Minute)
	if err := b.tokens.put(t.Context(), s, sharedTokenPrefix+"fleet", &due); err != nil {
		t.Fatal(err)
	}
	clock := useFakeClock(b, due.RefreshAt)
	sw.down.Store(true)
	attempts := 0
	for ; clock.Now().Before(start.Add(-time.Minute)); attempts++ {
		runPeriodicTolerant(b, s)
		held := storedShared(t, s, "fleet")
		if held == nil || held.AccessToken != old || !held.RefreshAt.After(clock.Now()) {
			t.Fatalf("a failed replacement at %v lost the token or stored no next attempt (stored: %v)", clock.Now(), held != nil && held.AccessToken == old)
		}
		if got := readShared(t, b, s, "fleet"); got != old {
			t.Fatal("a reader during the outage did not get the token that still serves")
		}
		clock.Set(held.RefreshAt)
	}
	if attempts < 5 || attempts > 40 || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("11 minutes of outage: %d attempts (want a backoff's few), %d revocations queued (want none)", attempts, len(pendingRevocations(t, s)))
	}
	lastPromise := storedShared(t, s, "fleet").RefreshAt

	sw.down.Store(false)
	runPeriodicTolerant(b, s)
	next := storedShared(t, s, "fleet")
	queued := pendingRevocations(t, s)
	if next.AccessToken == old || len(queued) != 1 || queued[0].AccessToken != old || !queued[0].NotBefore.Equal(lastPromise) {
		t.Fatalf("once ev.energy is back: want the token replaced and the old one queued until %v, got %s", lastPromise, describeRecords(queued))
	}
	eventually(t, 2*time.Minute, "the old token's revocation to land", func() bool {
		runPeriodicTolerant(b, s)
		return !sw.Active(old)
	})
	if tok, _ := sw.Token(old); !tok.Revoked || time.Now().Before(lastPromise) {
		t.Fatalf("the old token ended otherwise than by its revocation after %v", lastPromise)
	}
}

// describeRecords says what queued records are, without their tokens.
func describeRecords(records []*revocation) string {
	var described []string
	for _, rec := range records {
		if rec == nil {
			described = append(described, "none")
			continue
		}
		described = append(described, fmt.Sprintf("%s as %s not before %v", rec.Reason, rec.ClientID, rec.NotBefore))
	}
	return "[" + strings.Join(described, "; ") + "]"
}

// runPeriodicTolerant runs one periodic pass, which reports the failures of an outage.
func runPeriodicTolerant(b *backend, s logical.Storage) {
	_ = b.periodic(context.Background(), &logical.Request{Storage: s})
}

func TestSharedTokenSurvivesARestartAndAStandbyNeverMints(t *testing.T) {
	inmem := &logical.InmemStorage{}
	b, s, _ := newCountedBackend(t, inmem)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")
	requests := sv.TokenRequests()

	restarted, _ := newUnitBackend(t) // on the same storage, s

	if got := readShared(t, restarted, s, "fleet"); got != first || sv.TokenRequests() != requests {
		t.Fatalf("a restart minted (%d token requests) or served another token", sv.TokenRequests()-requests)
	}
	standby, _ := newUnitBackend(t)
	standby.System().(*logical.StaticSystemView).ReplicationStateVal = consts.ReplicationPerformanceStandby
	useFakeClock(standby, storedShared(t, s, "fleet").RefreshAt)
	if _, err := request(t, standby, s, logical.ReadOperation, "token/fleet", nil); !errors.Is(err, logical.ErrReadOnly) || sv.TokenRequests() != requests {
		t.Fatalf("a standby's read of a due token: %v, %d token requests; want it forwarded (ErrReadOnly) and none", err, sv.TokenRequests()-requests)
	}
}

func TestSharedTokenReplacedWhenClientOrScopesChange(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	sv.AddClient(standin.Client{ID: "other-client", Secret: "other-secret", Scopes: testScopes})
	writeSharedRole(t, b, s, "fleet", testScopes[0])
	readShared(t, b, s, "fleet")
	first := storedShared(t, s, "fleet")

	mustWrite(t, b, s, configPath, map[string]any{"client_id": "other-client", "client_secret": "other-secret"})
	// Only the stored shared token names the retired client now: it must be kept.
	if err := b.forgetSpentClients(t.Context(), s, time.Now().Add(24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if ids, err := b.retiredClientIDs(t.Context(), s); err != nil || !slices.Contains(ids, testClientID) {
		t.Fatalf("the retired client of a stored shared token was forgotten: %v %v", ids, err)
	}
	if got := readShared(t, b, s, "fleet"); got == first.AccessToken {
		t.Fatal("a reader got the token of the former client")
	}
	second := storedShared(t, s, "fleet")
	if second.ClientID != "other-client" {
		t.Fatalf("the token after the client change was minted by %s", second.ClientID)
	}
	mustWrite(t, b, s, rolePrefix+"fleet", map[string]any{"scopes": testScopes[1]})
	if got := readShared(t, b, s, "fleet"); got == second.AccessToken {
		t.Fatal("a reader got the token of the role's former scopes")
	}
	byToken := map[string]*revocation{}
	for _, rec := range pendingRevocations(t, s) {
		byToken[rec.AccessToken] = rec
	}
	for _, replaced := range []*grant{first, second} {
		rec := byToken[replaced.AccessToken]
		if rec == nil || rec.ClientID != replaced.ClientID || !rec.NotBefore.Equal(replaced.RefreshAt) || !sv.Active(replaced.AccessToken) {
			t.Fatalf("want the replaced token queued as %s until %v and alive until then, got %s", replaced.ClientID, replaced.RefreshAt, describeRecords([]*revocation{rec}))
		}
	}
}

func TestRotateAndDeleteRevokeTheSharedTokenNow(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")

	resp := mustWrite(t, b, s, "rotate-role/fleet", nil)
	if sv.Active(first) || len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], "restart them") {
		t.Fatalf("rotate: want the token revoked at once and a warning about leases and Agents, got active=%v %v", sv.Active(first), resp.Warnings)
	}
	second := readShared(t, b, s, "fleet")
	if second == first || !sv.Active(second) {
		t.Fatal("the read after a rotation did not mint a new token")
	}
	resp, err := request(t, b, s, logical.DeleteOperation, rolePrefix+"fleet", nil)
	if err != nil || sv.Active(second) || resp == nil || len(resp.Warnings) != 1 || storedShared(t, s, "fleet") != nil {
		t.Fatalf("delete: want the token revoked at once, forgotten, and a warning; got %v, warnings %v, active=%v", err, resp.Warnings, sv.Active(second))
	}
	writeSharedRole(t, b, s, "fleet")
	mustWrite(t, b, s, rolePrefix+"fleet", map[string]any{"shared": false})
	if resp, err := request(t, b, s, logical.UpdateOperation, "rotate-role/fleet", nil); err != nil || !resp.IsError() {
		t.Fatalf("rotating a role that is not shared: %v %v, want a 400", err, resp)
	}
}

func TestSharedLeaseEndRevokesNothingUnlessTheMountGoes(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	writeSharedRole(t, b, s, "fleet")
	secret, tok := leasedToken(t, b, s, "token/fleet")
	if len(secret.InternalData) != 2 || secret.InternalData["role"] != "fleet" {
		t.Fatalf("the lease carries %v, want only its role (and Vault's secret_type): the token is the role's", secret.InternalData)
	}
	if err := revokeLease(t, b, s, secret); err != nil || !sw.Active(tok) || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("one lease's end revoked or queued the token every reader shares: %v", err)
	}
	b.System().(*logical.StaticSystemView).TaintedVal = true
	sw.down.Store(true)
	err := revokeLease(t, b, s, secret)
	if err == nil || !sw.Active(tok) || len(pendingRevocations(t, s)) != 0 || errors.Is(err, logical.ErrInvalidRequest) {
		t.Fatalf("a lease's end while the mount is disabled and ev.energy is down: %v; want a plain error for Vault to retry, nothing queued", err)
	}
	sw.down.Store(false)
	if err := revokeLease(t, b, s, secret); err != nil || sw.Active(tok) {
		t.Fatalf("a lease's end while the mount is disabled: %v, token active: %v; want it revoked", err, sw.Active(tok))
	}
}

func TestSharedTokenMetrics(t *testing.T) {
	b, s := newUnitBackend(t)
	newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	readShared(t, b, s, "fleet")
	mustWrite(t, b, s, rolePrefix+"fleet", map[string]any{"scopes": testScopes[0]})
	readShared(t, b, s, "fleet")
	resp, err := request(t, b, s, logical.ReadOperation, "metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]float64{}
	for _, series := range resp.Data["evenergy_shared_tokens_total"].([]map[string]any) {
		counts[series["labels"].(map[string]string)["event"]] = series["value"].(float64)
	}
	if counts[sharedMinted] != 2 || counts[sharedReplaced] != 1 || len(counts) != 2 {
		t.Fatalf("shared tokens counted %v, want 2 minted and 1 replaced", counts)
	}
}

func TestAccSharedRoleSendsOneTokenRequestForAThousandReads(t *testing.T) {
	e := newAccEnv(t)
	e.write(t, "roles/fleet", map[string]any{"shared": true})
	before := e.standin.TokenRequests()
	var clients []*api.Client
	for range 50 {
		client, err := e.vault.Clone()
		if err != nil {
			t.Fatal(err)
		}
		client.SetToken(e.vault.Token())
		clients = append(clients, client)
	}
	tokens := readSharedConcurrently(t, func(reader int) (string, string) {
		read := time.Now()
		secret, err := clients[reader].Logical().Read(e.path("token/fleet"))
		if err != nil || secret == nil {
			return "", fmt.Sprintf("a read failed: %v", err)
		}
		if secret.Renewable {
			return "", "a renewable lease"
		}
		// The replacement time is the expiry less the default refresh_window.
		replacement, _ := time.Parse(time.RFC3339, secret.Data["expires_at"].(string))
		replacement = replacement.Add(-defaultRefreshWindow)
		if end := read.Add(time.Duration(secret.LeaseDuration) * time.Second); end.After(replacement.Add(time.Second)) {
			return "", fmt.Sprintf("a lease ending at %v, past the replacement time %v", end, replacement)
		}
		return secret.Data["access_token"].(string), ""
	})
	if n := e.standin.TokenRequests() - before; n != 1 || len(tokens) != 1 {
		t.Fatalf("1,000 reads from 50 clients sent %d token requests and got %d tokens, want 1 and 1", n, len(tokens))
	}
}

func TestAccDisablingTheMountRevokesTheSharedToken(t *testing.T) {
	e := newAccEnv(t)
	e.write(t, "roles/fleet", map[string]any{"shared": true})
	tok := e.read(t, "token/fleet").Data["access_token"].(string)
	if again := e.read(t, "token/fleet").Data["access_token"]; again != tok || !e.standin.Active(tok) {
		t.Fatal("two reads did not share one live token")
	}
	if err := e.vault.Sys().Unmount(e.mount); err != nil {
		t.Fatal(err)
	}
	if e.standin.Active(tok) {
		t.Fatal("the shared token is alive at ev.energy after its mount was disabled")
	}
}

func TestFailedFirstMintBacksOff(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	clock := useFakeClock(b, time.Now())
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	requests := sv.TokenRequests()
	tenFailedReadsMintOnce(t, b, s, sv, "after a failed mint")
	sv.SetFault(standin.Fault{})
	clock.Advance(refusedBackoff + refusedBackoff/2) // past the longest wait with refused readers, ±20%
	if tok := readShared(t, b, s, "fleet"); tok == "" || sv.TokenRequests()-requests != 2 {
		t.Fatalf("the read after the backoff: %d token requests in all, want 2", sv.TokenRequests()-requests)
	}
}

// tenFailedReadsMintOnce reads token/fleet 10 times in the same instant, when each must fail, and
// checks that they sent one token request.
func tenFailedReadsMintOnce(t *testing.T, b *backend, s logical.Storage, sv *standin.Server, when string) {
	t.Helper()
	requests := sv.TokenRequests()
	for range 10 {
		if _, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil); err == nil {
			t.Fatalf("a read %s got a token", when)
		}
	}
	if n := sv.TokenRequests() - requests; n != 1 {
		t.Fatalf("10 reads in the same instant %s sent %d token requests, want 1", when, n)
	}
}

// expectSharedReplaced checks that the role's token old is no longer served, and is queued for
// revocation as its client once its leases end (at its refresh point), alive until then.
func expectSharedReplaced(t *testing.T, b *backend, s logical.Storage, sv *standin.Server, name string, old *grant) {
	t.Helper()
	if got := readShared(t, b, s, name); got == old.AccessToken {
		t.Fatal("a reader still got the token minted before the change")
	}
	for _, rec := range pendingRevocations(t, s) {
		if rec.AccessToken == old.AccessToken {
			if rec.ClientID != old.ClientID || !rec.NotBefore.Equal(old.RefreshAt) || !sv.Active(old.AccessToken) {
				t.Fatalf("want the replaced token queued as %s until %v and alive until then, got %s", old.ClientID, old.RefreshAt, describeRecords([]*revocation{rec}))
			}
			return
		}
	}
	t.Fatal("the replaced token was not queued for revocation")
}

func TestSharedTokenReplacedWhenTheSecretChanges(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")

	mustWrite(t, b, s, configPath, map[string]any{"request_timeout": "20s"})
	if got := readShared(t, b, s, "fleet"); got != first || len(pendingRevocations(t, s)) != 0 {
		t.Fatal("a config write that changes nothing a token is minted with replaced the shared token")
	}
	minted := storedShared(t, s, "fleet")
	sv.AddClient(standin.Client{ID: testClientID, Secret: "rotated-secret", Scopes: testScopes})
	mustWrite(t, b, s, configPath, map[string]any{"client_secret": "rotated-secret"})
	expectSharedReplaced(t, b, s, sv, "fleet", minted)
}

// sharedTokenDueByCheck mints the shared role fleet's token, then runs check-grants a second later,
// on a fake clock, which makes it due; it returns the token as stored before the check.
func sharedTokenDueByCheck(t *testing.T) (*backend, logical.Storage, *standin.Server, *grant, *fakeClock) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	readShared(t, b, s, "fleet")
	minted := storedShared(t, s, "fleet")
	clock := useFakeClock(b, time.Now().Add(time.Second))
	mustWrite(t, b, s, "check-grants", nil)
	return b, s, sv, minted, clock
}

// TestCheckGrantsReplacesSharedTokensMintedBefore: after a restore, a shared token stored in the
// snapshot may have been replaced and revoked since; check-grants replaces the ones minted before it,
// and revokes each once the leases handed out for it have ended.
func TestCheckGrantsReplacesSharedTokensMintedBefore(t *testing.T) {
	b, s, sv, minted, clock := sharedTokenDueByCheck(t)
	runPeriodic(t, b, s)
	next := storedShared(t, s, "fleet")
	if next == nil || next.AccessToken == minted.AccessToken || !sv.Active(next.AccessToken) {
		t.Fatal("the background refresh after check-grants did not replace the shared token minted before it")
	}
	// Its leases run until its stored point: revoking it at the check's time would end them early.
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].AccessToken != minted.AccessToken || !queued[0].NotBefore.Equal(minted.RefreshAt) || !minted.RefreshAt.After(clock.Now()) {
		t.Fatalf("want the token minted before the check queued for revocation at its stored point %v, got %s", minted.RefreshAt, describeRecords(queued))
	}
}

// TestFailedReplacementAfterCheckGrantsKeepsTheLeasesEnd: check-grants makes a shared token due early
// and its replacement fails; the token stays stored with its point where its leases end, so the
// replacement that goes through later queues it there. Before, the failure's next attempt became the
// stored point, and the token was revoked seconds later while its leases ran for hours (seed 15).
func TestFailedReplacementAfterCheckGrantsKeepsTheLeasesEnd(t *testing.T) {
	b, s, sv, minted, clock := sharedTokenDueByCheck(t)
	sv.SetFault(standin.Fault{Kind: standin.FaultServerError})
	runPeriodicTolerant(b, s)
	sv.SetFault(standin.Fault{})
	if held := storedShared(t, s, "fleet"); held == nil || held.AccessToken != minted.AccessToken || !held.RefreshAt.Equal(minted.RefreshAt) {
		t.Fatalf("after a failed replacement the stored point moved from %v (where the leases end) to %v", minted.RefreshAt, held.RefreshAt)
	}
	clock.Advance(time.Hour) // past any backoff: the background refresh's next round replaces it
	eventually(t, 30*time.Second, "the shared token replaced after the backoff", func() bool {
		next := storedShared(t, s, "fleet")
		return next != nil && next.AccessToken != minted.AccessToken
	})
	queued := pendingRevocations(t, s)
	if len(queued) != 1 || queued[0].AccessToken != minted.AccessToken || !queued[0].NotBefore.Equal(minted.RefreshAt) || !sv.Active(minted.AccessToken) {
		t.Fatalf("want the replaced token alive and queued for revocation at %v, where its leases end, got %s", minted.RefreshAt, describeRecords(queued))
	}
}

// TestReplacementWhoseQueueWriteIsRefusedKeepsTheOldToken: when storage refuses to queue a due
// shared token's revocation, a reader's read mints nothing (no owner could be recorded for its
// successor) and answers the error; the old token stays stored and alive for its leases. Before, the
// new token replaced it in storage and the old one was revoked at once, or, when ev.energy failed
// that too, owned by nothing (seed 256).
func TestReplacementWhoseQueueWriteIsRefusedKeepsTheOldToken(t *testing.T) {
	b, s, sv, minted, _ := sharedTokenDueByCheck(t)
	requests := sv.TokenRequests()
	resp, err := request(t, b, failingStorage{Storage: s, prefix: revocationPrefix}, logical.ReadOperation, "token/fleet", nil)
	if err == nil && !resp.IsError() {
		t.Fatal("a read that could not queue the old token's revocation got a token")
	}
	if n := sv.TokenRequests() - requests; n != 0 {
		t.Fatalf("the read sent %d token requests while the queue refused the old token's revocation, want 0", n)
	}
	if stored := storedShared(t, s, "fleet"); stored == nil || stored.AccessToken != minted.AccessToken || !sv.Active(minted.AccessToken) {
		t.Fatal("the old token, whose revocation storage refused to queue, is no longer stored and alive")
	}
}

// TestMintDecidesFromStorageNotMemory: when memory misses the stored shared token (as a start-up load
// racing the mint that stored it can leave it), a read mints nothing and overwrites nothing: the
// token stored is served. Before, the read minted another and stored it over the first, which no
// revocation record held (N4, regression seed n4-shared-token-replaced-unqueued).
func TestMintDecidesFromStorageNotMemory(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")
	requests := sv.TokenRequests()

	b.tokens.mu.Lock() // memory believes the role has no token, while storage holds it
	b.tokens.drop(sharedTokenPrefix + "fleet")
	delete(b.tokens.stale, sharedTokenPrefix+"fleet")
	b.tokens.loaded = true
	b.tokens.mu.Unlock()

	if got := readShared(t, b, s, "fleet"); got != first || sv.TokenRequests() != requests {
		t.Fatalf("a read whose memory missed the stored token sent %d token requests and got another token", sv.TokenRequests()-requests)
	}
	if stored := storedShared(t, s, "fleet"); stored == nil || stored.AccessToken != first {
		t.Fatal("the stored shared token was overwritten")
	}
}

// gatedMint holds the stand-in's client-credentials token requests until release is closed, and
// tells arrived of each.
type gatedMint struct {
	*standin.Server
	arrived chan struct{}
	release chan struct{}
}

func (g *gatedMint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/o/token" && r.Header.Get("Authorization") != "" {
		g.arrived <- struct{}{}
		<-g.release
	}
	g.Server.ServeHTTP(w, r)
}

// newGatedUnit is a unit backend configured against a stand-in whose mints wait for releaseMint.
func newGatedUnit(t *testing.T) (b *backend, s logical.Storage, gate *gatedMint, releaseMint func()) {
	t.Helper()
	b, s = newUnitBackend(t)
	gate = &gatedMint{Server: newTestStandin(), arrived: make(chan struct{}, 1), release: make(chan struct{})}
	unitConfig(t, b, s, gate)
	var releaseOnce sync.Once
	releaseMint = func() { releaseOnce.Do(func() { close(gate.release) }) }
	t.Cleanup(releaseMint) // before the server closes, which waits for held requests
	return b, s, gate, releaseMint
}

// TestRoleWriteDuringAMintLeavesNoTokenOfTheOldScopes: a role write changing the scopes while a
// read's mint with the old ones is in flight ends the token that mint stores; the next read gets a
// token of the new scopes.
func TestRoleWriteDuringAMintLeavesNoTokenOfTheOldScopes(t *testing.T) {
	b, s, gate, releaseMint := newGatedUnit(t)
	writeSharedRole(t, b, s, "fleet", testScopes[0])
	read := make(chan string, 1)
	go func() {
		resp, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil)
		if err != nil || resp.IsError() {
			read <- fmt.Sprint("error: ", err, resp)
			return
		}
		read <- resp.Data["scope"].(string)
	}()
	<-gate.arrived
	written := make(chan error)
	go func() {
		_, err := request(t, b, s, logical.UpdateOperation, rolePrefix+"fleet", map[string]any{"scopes": testScopes[1]})
		written <- err
	}()
	// The write waits for the token's lock, which the mint holds; let the mint go once it waits.
	for deadline := time.Now().Add(30 * time.Second); lockRefs(&b.tokens.locks, sharedTokenPrefix+"fleet") < 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the role write did not come to wait for the token's lock within 30 s")
		}
	}
	releaseMint()
	if got := <-read; got != testScopes[0] {
		t.Fatalf("the read whose mint was in flight got %q", got)
	}
	if err := <-written; err != nil {
		t.Fatal(err)
	}
	resp, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil)
	if err != nil || resp.IsError() || resp.Data["scope"] != testScopes[1] {
		t.Fatalf("the read after the role write: %v %v, want a token of scope %s", err, resp, testScopes[1])
	}
}

// lockRefs is how many hold or wait for key's lock.
func lockRefs(m *keyedMutex, key string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[key]; e != nil {
		return e.refs
	}
	return 0
}

// TestRefusedQueueWriteKeepsTheSharedToken: ending a shared token queues its revocation before it
// forgets it, so a queue write storage refuses leaves the token stored and the caller gets the error;
// a retry then ends it. Forgotten first, it was owned by nothing for up to its 10 hours.
func TestRefusedQueueWriteKeepsTheSharedToken(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	writeSharedRole(t, b, s, "fleet")
	tok := readShared(t, b, s, "fleet")
	sw.down.Store(true) // no revocation now: each must be queued
	refusing := failingStorage{Storage: s, prefix: revocationPrefix}
	for _, write := range []struct {
		path string
		data map[string]any
	}{{"rotate-role/fleet", nil}, {rolePrefix + "fleet", map[string]any{"shared": false}}} {
		resp, err := request(t, b, refusing, logical.UpdateOperation, write.path, write.data)
		if err == nil && !resp.IsError() {
			t.Fatalf("%s answered success while its token's revocation could not be queued", write.path)
		}
		if st := storedShared(t, s, "fleet"); st == nil || st.AccessToken != tok {
			t.Fatalf("%s forgot the token it could not queue for revocation", write.path)
		}
	}
	mustWrite(t, b, s, rolePrefix+"fleet", map[string]any{"shared": false})
	queued := pendingRevocations(t, s)
	if storedShared(t, s, "fleet") != nil || len(queued) != 1 || queued[0].AccessToken != tok {
		t.Fatalf("the retried write: want the token forgotten and queued, got %s", describeRecords(queued))
	}
}

// sharedScope reads token/<role> and returns the scope of the token it got.
func sharedScope(t *testing.T, b *backend, s logical.Storage, name string) string {
	t.Helper()
	resp, err := request(t, b, s, logical.ReadOperation, "token/"+name, nil)
	if err != nil || resp.IsError() {
		t.Fatalf("token/%s: %v %v", name, err, resp)
	}
	return resp.Data["scope"].(string)
}

// TestSharedTokenOfOtherScopesIsNeverServed: what a shared read serves depends on what the stored
// token was minted with, not on write events: a role write retried after its set-aside failed, and
// a config delete then create, change the scopes without setting the token aside, and the next read
// still gets a token of the new scopes.
func TestSharedTokenOfOtherScopesIsNeverServed(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	writeSharedRole(t, b, s, "fleet", testScopes[0])
	writeSharedRole(t, b, s, "plain") // the config's scopes
	old := readShared(t, b, s, "fleet")
	readShared(t, b, s, "plain")

	sw.down.Store(true)
	refusing := failingStorage{Storage: s, prefix: revocationPrefix}
	if _, err := request(t, b, refusing, logical.UpdateOperation, rolePrefix+"fleet", map[string]any{"scopes": testScopes[1]}); err == nil {
		t.Fatal("the role write whose set-aside could not be queued answered success")
	}
	sw.down.Store(false)
	mustWrite(t, b, s, rolePrefix+"fleet", map[string]any{"scopes": testScopes[1]}) // the retry: the stored role has these scopes already
	if got := sharedScope(t, b, s, "fleet"); got != testScopes[1] {
		t.Fatalf("after a retried role write: a token of scope %q, want %q", got, testScopes[1])
	}
	if rec := pendingRevocations(t, s); len(rec) != 1 || rec[0].AccessToken != old {
		t.Fatalf("the token of the former scopes is not queued alone: %s", describeRecords(rec))
	}

	cfg, err := getConfig(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := request(t, b, s, logical.DeleteOperation, configPath, nil); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, b, s, configPath, map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": cfg.BaseURL, "scopes": testScopes[1]})
	if got := sharedScope(t, b, s, "plain"); got != testScopes[1] {
		t.Fatalf("after a config delete and create: a token of scope %q, want %q", got, testScopes[1])
	}
}

// TestConfigWriteDuringAFirstMintLeavesNoTokenOfTheOldScopes: a config write changing the scopes
// while a role's first mint is in flight finds no token to set aside; the token that mint stores,
// of the old scopes, is not served after the write.
func TestConfigWriteDuringAFirstMintLeavesNoTokenOfTheOldScopes(t *testing.T) {
	b, s, gate, releaseMint := newGatedUnit(t)
	writeSharedRole(t, b, s, "fleet")
	read := make(chan error, 1)
	go func() {
		_, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil)
		read <- err
	}()
	<-gate.arrived
	mustWrite(t, b, s, configPath, map[string]any{"scopes": testScopes[1]})
	releaseMint()
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	if got := sharedScope(t, b, s, "fleet"); got != testScopes[1] {
		t.Fatalf("the read after the config write got a token of scope %q, want %q", got, testScopes[1])
	}
}

// TestSharedTokenLeftAfterItsRoleStopsSharingIsRevoked: a token left stored after its role stopped
// sharing (the set-aside could not be queued) is queued by the next periodic pass, not only once due
// (hours away: seed 13), for when its leases end, and forgotten; the background refresh then stops
// instead of a round every second.
func TestSharedTokenLeftAfterItsRoleStopsSharingIsRevoked(t *testing.T) {
	b, s, sw := newSwitchableUnit(t)
	writeSharedRole(t, b, s, "fleet")
	readShared(t, b, s, "fleet")
	sw.down.Store(true)
	if _, err := request(t, b, failingStorage{Storage: s, prefix: revocationPrefix}, logical.UpdateOperation, rolePrefix+"fleet", map[string]any{"shared": false}); err == nil {
		t.Fatal("the role write whose set-aside could not be queued answered success")
	}
	sw.down.Store(false)
	left := storedShared(t, s, "fleet")
	runPeriodic(t, b, s)
	queued := pendingRevocations(t, s)
	if storedShared(t, s, "fleet") != nil || len(queued) != 1 || queued[0].AccessToken != left.AccessToken || !queued[0].NotBefore.Equal(left.RefreshAt) {
		t.Fatalf("want the left token forgotten and queued until %v, got %s", left.RefreshAt, describeRecords(queued))
	}
	eventually(t, 20*time.Second, "the background refresh to stop, with nothing due", func() bool {
		if !b.refreshing.TryLock() {
			return false
		}
		b.refreshing.Unlock()
		return true
	})
}

// TestRefusedStorageHandsTheSharedMintToOneReader: while storage refuses every write (the shared
// token's and the revocation queue's), the token minted is handed to the first reader under a lease
// of its own, which revokes it when it ends; the next attempt is held back as after a failed mint, so
// the other reads in the same instant fail without a token request. Before, the token was revoked,
// and when ev.energy failed that and the queue write was refused too, nothing owned it (seed 27).
func TestRefusedStorageHandsTheSharedMintToOneReader(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	useFakeClock(b, time.Now())
	refusing := failingStorage{Storage: s, prefix: ""}
	requests := sv.TokenRequests()
	secret, tok := leasedToken(t, b, refusing, "token/fleet")
	if secret.LeaseOptions.Renewable != true || !sv.Active(tok) {
		t.Fatalf("the reader got a shared lease, or a dead token, for a token storage refused (renewable %v)", secret.LeaseOptions.Renewable)
	}
	for range 9 {
		if _, err := request(t, b, refusing, logical.ReadOperation, "token/fleet", nil); err == nil {
			t.Fatal("a read in the same instant while storage refuses got a token")
		}
	}
	if n := sv.TokenRequests() - requests; n != 1 {
		t.Fatalf("10 reads in the same instant while storage refuses sent %d token requests, want 1", n)
	}
	if err := revokeLease(t, b, s, secret); err != nil {
		t.Fatal(err)
	}
	if sv.Active(tok) {
		t.Fatal("the reader's lease ended and its token is alive at ev.energy")
	}
}

// TestSharedTokenWithAShortWindowIsReplacedBeforeItExpires: with refresh_window under the periodic
// pass's minute, a shared token nobody reads comes due at least a pass before it expires, so the
// pass after its point replaces it while it lives.
func TestSharedTokenWithAShortWindowIsReplacedBeforeItExpires(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	mustWrite(t, b, s, configPath, map[string]any{"refresh_window": "30s"})
	writeSharedRole(t, b, s, "fleet")
	readShared(t, b, s, "fleet")
	st := storedShared(t, s, "fleet")
	clock := useFakeClock(b, st.RefreshAt.Add(-time.Second))
	runPeriodic(t, b, s) // the last pass before the point
	clock.Advance(time.Minute + passBudget)
	if !clock.Now().Before(st.ExpiresAt) {
		t.Fatalf("the token's point (%v before its expiry) leaves the next pass after it past its expiry", st.ExpiresAt.Sub(st.RefreshAt))
	}
	runPeriodic(t, b, s)
	if next := storedShared(t, s, "fleet"); next.AccessToken == st.AccessToken || !sv.Active(next.AccessToken) {
		t.Fatal("the pass after the point did not replace the shared token")
	}
}

// TestSharedTokenFingerprint: a shared token's fingerprint matches the role and config it was minted
// with and no other client, secret or scopes, and holds no secret.
func TestSharedTokenFingerprint(t *testing.T) {
	cfg := &config{ClientID: "c", ClientSecret: "the-secret", Scopes: []string{"a", "b"}}
	for _, r := range []*role{{}, {Scopes: []string{"a"}}, {Scopes: []string{"a", "bc"}}} {
		fp := mintedWith(cfg, r)
		if !mintedAs(fp, cfg, r) || strings.Contains(fp, cfg.ClientSecret) {
			t.Fatalf("the fingerprint of scopes %v does not match itself, or holds the secret", r.tokenScopes(cfg))
		}
		for _, other := range []*role{{Scopes: []string{"a"}}, {Scopes: []string{"a", "b", "c"}}, {Scopes: []string{"b"}}, {Scopes: []string{"ab"}}} {
			if !slices.Equal(other.tokenScopes(cfg), r.tokenScopes(cfg)) && mintedAs(fp, cfg, other) {
				t.Fatalf("the fingerprint of scopes %v matches scopes %v", r.tokenScopes(cfg), other.Scopes)
			}
		}
		for _, other := range []*config{{ClientID: "c", ClientSecret: "rotated", Scopes: cfg.Scopes}, {ClientID: "d", ClientSecret: cfg.ClientSecret, Scopes: cfg.Scopes}} {
			if mintedAs(fp, other, r) {
				t.Fatalf("the fingerprint of client %s matches client %s with its secret changed=%v", cfg.ClientID, other.ClientID, other.ClientSecret != cfg.ClientSecret)
			}
		}
	}
	if public := (&config{ClientID: "c"}); !mintedAs(mintedWith(public, &role{}), public, &role{}) || mintedAs("", public, &role{}) {
		t.Fatal("a public client with no scopes: its fingerprint does not match itself, or nothing matches it")
	}
}

// refusingDelete refuses to delete the keys under prefix, as storage losing its quorum would.
type refusingDelete struct {
	logical.Storage
	prefix string
}

func (r refusingDelete) Delete(ctx context.Context, key string) error {
	if strings.HasPrefix(key, r.prefix) {
		return errors.New("storage unavailable")
	}
	return r.Storage.Delete(ctx, key)
}

// TestRotateRoleWhoseForgetIsRefusedLeasesNoRevokedToken: why: rotate-role revokes the shared token
// at ev.energy before it forgets it; when storage refuses the forget, readers must not get leases
// on the revoked token still stored, and a retry of the rotation completes it.
func TestRotateRoleWhoseForgetIsRefusedLeasesNoRevokedToken(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")
	if _, err := request(t, b, refusingDelete{Storage: s, prefix: sharedTokenPrefix}, logical.UpdateOperation, "rotate-role/fleet", nil); err == nil {
		t.Fatal("a rotation whose forget storage refused answered success")
	}
	if sv.Active(first) {
		t.Fatal("setup: the rotation did not revoke the token before forgetting it")
	}
	resp, err := request(t, b, s, logical.ReadOperation, "token/fleet", nil)
	if err == nil && !resp.IsError() && resp.Data["access_token"] == first {
		t.Fatalf("a reader got a lease of %v on the shared token rotate-role revoked", resp.Secret.TTL)
	}
	// The operator's retry, storage back: it completes, and the next read mints anew.
	b, s = newUnitBackend(t)
	sv = newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first = readShared(t, b, s, "fleet")
	if _, err := request(t, b, refusingDelete{Storage: s, prefix: sharedTokenPrefix}, logical.UpdateOperation, "rotate-role/fleet", nil); err == nil {
		t.Fatal("a rotation whose forget storage refused answered success")
	}
	if resp, err := request(t, b, s, logical.UpdateOperation, "rotate-role/fleet", nil); err != nil || resp.IsError() {
		t.Fatalf("the retried rotation failed: %v %v", err, resp)
	}
	if g := storedShared(t, s, "fleet"); g != nil || len(pendingRevocations(t, s)) != 0 {
		t.Fatalf("after the retried rotation: stored %v, %d revocations queued; want none", g, len(pendingRevocations(t, s)))
	}
	if second := readShared(t, b, s, "fleet"); second == first || !sv.Active(second) {
		t.Fatal("the read after the retried rotation did not mint a new token")
	}
}

// TestRotateRoleWhoseMarkIsRefusedRevokesNothing: why: rotate-role marks the stored token ended
// before it revokes it; when storage refuses that write, nothing is revoked, the caller gets the
// error, and readers keep the token, still owned.
func TestRotateRoleWhoseMarkIsRefusedRevokesNothing(t *testing.T) {
	s := &refusingStorage{Storage: &logical.InmemStorage{}}
	b, _, _ := newCountedBackend(t, s)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")
	s.refuse.Store(true)
	if _, err := request(t, b, s, logical.UpdateOperation, "rotate-role/fleet", nil); err == nil {
		t.Fatal("a rotation whose writes storage refused answered success")
	}
	if !sv.Active(first) || len(pendingRevocations(t, s)) != 0 {
		t.Fatal("a rotation that could not mark the token ended revoked or queued it")
	}
	s.refuse.Store(false)
	if again := readShared(t, b, s, "fleet"); again != first {
		t.Fatal("the token a failed rotation left was not served")
	}
}

// TestRefusedQueueMintsNoReplacementSharedToken: while storage refuses the revocation queue, the
// background pass does not replace a due shared token: the old one's revocation is queued before the
// mint, so no token is minted that nothing could own (seed 14), and the old one stays stored.
func TestRefusedQueueMintsNoReplacementSharedToken(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newUnitStandin(t, b, s)
	writeSharedRole(t, b, s, "fleet")
	first := readShared(t, b, s, "fleet")
	useFakeClock(b, storedShared(t, s, "fleet").RefreshAt)
	requests := sv.TokenRequests()
	runPeriodicTolerant(b, failingStorage{Storage: s, prefix: revocationPrefix})
	if n := sv.TokenRequests() - requests; n != 0 {
		t.Fatalf("the pass sent %d token requests while the queue refused the old token's revocation, want 0", n)
	}
	if st := storedShared(t, s, "fleet"); st == nil || st.AccessToken != first || !sv.Active(first) {
		t.Fatal("the old shared token is no longer stored and alive while its revocation could not be queued")
	}
}
