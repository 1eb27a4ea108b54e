package evenergy

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

func TestLeaseTTLsNeverOutliveTheToken(t *testing.T) {
	now := time.Now()
	expiry := now.Add(time.Hour)
	cases := []struct {
		name        string
		role        role
		expiry      time.Time
		ttl, maxTTL time.Duration
	}{
		{"no role TTL: Vault applies the mount's default, capped at the token", role{}, expiry, 0, time.Hour},
		{"shorter role TTLs win", role{TTL: time.Minute, MaxTTL: 2 * time.Minute}, expiry, time.Minute, 2 * time.Minute},
		{"longer role TTLs are capped", role{TTL: 2 * time.Hour, MaxTTL: 3 * time.Hour}, expiry, time.Hour, time.Hour},
		{"no expiry known", role{TTL: time.Minute}, time.Time{}, time.Minute, 0},
	}
	for _, tc := range cases {
		ttl, maxTTL := leaseTTLs(&tc.role, now, tc.expiry)
		if ttl.Round(time.Second) != tc.ttl || maxTTL != tc.maxTTL {
			t.Errorf("%s: got ttl %v max %v, want %v and %v", tc.name, ttl, maxTTL, tc.ttl, tc.maxTTL)
		}
	}
}

// standinToken checks that a token Vault handed out is a live access token at the stand-in.
func (e *accEnv) standinToken(t *testing.T, s *api.Secret) string {
	t.Helper()
	tok, _ := s.Data["access_token"].(string)
	info, ok := e.standin.Token(tok)
	if !ok || info.Kind != "access" || !e.standin.Active(tok) {
		t.Fatalf("Vault returned a token the stand-in did not issue or does not hold active (known=%v kind=%q)", ok, info.Kind)
	}
	return tok
}

func (e *accEnv) revoked(tok string) bool {
	info, ok := e.standin.Token(tok)
	return ok && info.Revoked
}

func TestAccTokenRead(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	s := e.read(t, "token")
	tok := e.standinToken(t, s)
	if info, _ := e.standin.Token(tok); info.Grant != "client_credentials" || info.ClientID != testClientID {
		t.Fatalf("token came from grant %q of client %q", info.Grant, info.ClientID)
	}
	if s.Data["token_type"] != "Bearer" || s.Data["scope"] != "charging_session:read vehicle:read" {
		t.Fatalf("token_type=%v scope=%v", s.Data["token_type"], s.Data["scope"])
	}
	if _, ok := s.Data["refresh_token"]; ok {
		t.Fatal("response carries a refresh_token")
	}
	expiresAt, err := time.Parse(time.RFC3339, s.Data["expires_at"].(string))
	if err != nil || time.Until(expiresAt) < 35990*time.Second || time.Until(expiresAt) > 36000*time.Second {
		t.Fatalf("expires_at %v is not 36000 s away: %v", s.Data["expires_at"], err)
	}
	if s.LeaseID == "" || !s.Renewable || s.LeaseDuration <= 0 || s.LeaseDuration > 36000 {
		t.Fatalf("lease id=%q renewable=%v duration=%d", s.LeaseID, s.Renewable, s.LeaseDuration)
	}
	if again := e.standinToken(t, e.read(t, "token")); again == tok {
		t.Fatal("two reads returned the same token; each lease needs its own")
	}
}

func TestAccTokenLeaseRevokeRevokesAtEvenergy(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	first := e.read(t, "token")
	tok := e.standinToken(t, first)
	if err := e.vault.Sys().Revoke(first.LeaseID); err != nil {
		t.Fatal(err)
	}
	if !e.revoked(tok) {
		t.Fatal("lease revoked, token still live at ev.energy")
	}

	tokens := []string{e.standinToken(t, e.read(t, "token")), e.standinToken(t, e.read(t, "token"))}
	if err := e.vault.Sys().RevokePrefix(e.mount + "/"); err != nil {
		t.Fatal(err)
	}
	for _, tok := range tokens {
		if !e.revoked(tok) {
			t.Fatal("revoke -prefix left a token live at ev.energy")
		}
	}
	e.wantLeases(t, "token", 0)
}

func TestAccTokenLeaseExpiryRevokesAtEvenergy(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.write(t, "roles/brief", map[string]any{"ttl": "2s"})
	s := e.read(t, "token/brief")
	if s.LeaseDuration != 2 {
		t.Fatalf("lease duration %d, want the role's 2 s", s.LeaseDuration)
	}
	tok := e.standinToken(t, s)
	eventually(t, 30*time.Second, "the expired lease's token to be revoked at ev.energy", func() bool { return e.revoked(tok) })
}

func TestAccTokenLeaseCappedAtTokenExpiry(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.standin.SetTokenLifetime(30 * time.Second)
	e.write(t, "roles/long", map[string]any{"ttl": "10s", "max_ttl": "2h"})

	if s := e.read(t, "token"); s.LeaseDuration > 30 {
		t.Fatalf("lease of %d s outlives a 30 s token", s.LeaseDuration)
	}
	s := e.read(t, "token/long")
	tok := e.standinToken(t, s)
	expiresAt, _ := time.Parse(time.RFC3339, s.Data["expires_at"].(string))
	if s.LeaseDuration != 10 {
		t.Fatalf("lease duration %d, want the role's 10 s", s.LeaseDuration)
	}
	renewed, err := e.vault.Sys().Renew(s.LeaseID, 3600)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.LeaseDuration <= 0 || renewed.LeaseDuration > 30 {
		t.Fatalf("renewal gave %d s; it must stay within the 30 s token", renewed.LeaseDuration)
	}
	lookup, err := e.vault.Logical().Write("sys/leases/lookup", map[string]any{"lease_id": s.LeaseID})
	if err != nil {
		t.Fatal(err)
	}
	leaseEnd, _ := time.Parse(time.RFC3339Nano, lookup.Data["expire_time"].(string))
	if leaseEnd.After(expiresAt.Add(time.Second)) {
		t.Fatalf("renewed lease ends %v, after the token's expiry %v", leaseEnd, expiresAt)
	}
	if !e.standin.Active(tok) || len(e.standin.Tokens()) != 2 {
		t.Fatal("renewal swapped or revoked the token")
	}
}

// TestAccTokenLeaseFollowsTheTunedMount: a read with no role TTL leaves the TTL to Vault, which
// applies the mount's default lease TTL as tuned at that moment.
func TestAccTokenLeaseFollowsTheTunedMount(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	for _, ttl := range []string{"45s", "2m"} {
		if err := e.vault.Sys().TuneMount(e.mount, api.MountConfigInput{DefaultLeaseTTL: ttl}); err != nil {
			t.Fatal(err)
		}
		want, _ := time.ParseDuration(ttl)
		if s := e.read(t, "token"); s.LeaseDuration != int(want.Seconds()) {
			t.Fatalf("mount tuned to a %s default: lease of %d s", ttl, s.LeaseDuration)
		}
	}
}

func TestAccTokenRoleScopes(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.write(t, "roles/vehicles", map[string]any{"scopes": "vehicle:read", "ttl": "60s"})
	s := e.read(t, "token/vehicles")
	info, _ := e.standin.Token(e.standinToken(t, s))
	if s.Data["scope"] != "vehicle:read" || info.Scope != "vehicle:read" || s.LeaseDuration != 60 {
		t.Fatalf("scope=%v at ev.energy=%q lease=%d", s.Data["scope"], info.Scope, s.LeaseDuration)
	}

	e.write(t, "roles/too-much", map[string]any{"scopes": "vehicle:write"})
	e.wantReadError(t, "token/too-much", http.StatusBadRequest, "invalid_scope")
	e.wantReadError(t, "token/nope", http.StatusBadRequest, "role nope does not exist")
	e.wantLeases(t, "token", 1)
}

func TestAccTokenWrongCredentials(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.write(t, "config", map[string]any{"client_secret": "not-the-secret"})
	e.wantReadError(t, "token", http.StatusBadRequest, "ev.energy refused the token request: invalid_client")
	e.wantLeases(t, "token", 0)
	if n := len(e.standin.Tokens()); n != 0 {
		t.Fatalf("a refused request left %d tokens at ev.energy", n)
	}
}

func TestAccTokenEvenergyDown(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	closed, err := freeLoopbackAddr()
	if err != nil {
		t.Fatal(err)
	}
	e.write(t, "config", map[string]any{"base_url": "http://" + closed})
	e.wantReadError(t, "token", http.StatusBadGateway, "could not connect to ev.energy for the token request: connection refused")

	e.write(t, "config", map[string]any{"base_url": e.url})
	e.outage.Store(true)
	e.wantReadError(t, "token", http.StatusBadGateway, "ev.energy failed the token request with HTTP 503")
	e.wantLeases(t, "token", 0)
}

func TestAccTokenRevocationQueuedWhileEvenergyDown(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	s := e.read(t, "token")
	tok := e.standinToken(t, s)
	e.outage.Store(true)
	if err := e.vault.Sys().Revoke(s.LeaseID); err != nil {
		t.Fatalf("a lease whose token ev.energy cannot revoke now must end all the same (queued): %v", err)
	}
	e.wantLeases(t, "token", 0)
	if !e.standin.Active(tok) {
		t.Fatal("the stand-in was down, yet the token is revoked")
	}
	queue := e.read(t, "revocations")
	if n, _ := queue.Data["pending"].(json.Number).Int64(); n != 1 {
		t.Fatalf("revocations shows %v pending, want 1", queue.Data["pending"])
	}
	e.outage.Store(false)
	queue = e.write(t, "revocations", nil)
	if n, _ := queue.Data["pending"].(json.Number).Int64(); n != 0 || !e.revoked(tok) {
		t.Fatalf("after the retry: %v pending, token revoked=%v", queue.Data["pending"], e.revoked(tok))
	}
}

// unitConfig configures a unit backend against handler, a real HTTP server in front of sv.
func unitConfig(t *testing.T, b *backend, s logical.Storage, handler http.Handler) {
	t.Helper()
	server := httptest.NewServer(handler)
	t.Cleanup(server.Close)
	resp, err := request(t, b, s, logical.CreateOperation, "config", map[string]any{"client_id": testClientID, "client_secret": testClientSecret, "base_url": server.URL, "callback_url": unitCallback})
	if err != nil || resp.IsError() {
		t.Fatalf("config: %v %v", err, resp)
	}
}

func newTestStandin() *standin.Server {
	sv := standin.New()
	sv.AddClient(standin.Client{ID: testClientID, Secret: testClientSecret, Scopes: testScopes})
	return sv
}

func TestTokenMintedForACallerWhoLeftIsRevoked(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	ctx, callerLeaves := context.WithCancel(t.Context())
	// The caller goes away while ev.energy is issuing the token: it is issued all the same.
	unitConfig(t, b, s, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sv.ServeHTTP(w, r)
		if r.URL.Path == "/o/token" {
			callerLeaves()
		}
	}))
	_, err := b.HandleRequest(ctx, &logical.Request{Operation: logical.ReadOperation, Path: "token", Storage: s})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("want the request to fail with its caller gone, got %v", err)
	}
	tokens := sv.Tokens()
	if len(tokens) != 1 || !tokens[0].Revoked {
		t.Fatalf("want the one minted token revoked at ev.energy, got %d tokens (revoked: %v)", len(tokens), len(tokens) == 1 && tokens[0].Revoked)
	}
	if queued := pendingRevocations(t, s); len(queued) != 0 {
		t.Fatalf("%d revocations queued after the token was revoked", len(queued))
	}
}

// failingStorage fails every write under prefix, as a storage backend that lost its quorum would.
type failingStorage struct {
	logical.Storage
	prefix string
}

func (f failingStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if strings.HasPrefix(e.Key, f.prefix) {
		return errors.New("storage unavailable")
	}
	return f.Storage.Put(ctx, e)
}

// TestWriteAheadRollbackRevokesAnOrphan: versions before v0.3 wrote a write-ahead record around
// each mint; one left behind is revoked after an upgrade.
func TestWriteAheadRollbackRevokesAnOrphan(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	unitConfig(t, b, s, sv)
	cfg, err := getConfig(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	// The plugin died between the mint and its answer: only the write-ahead record knows the token.
	tok, err := testClient(cfg).clientCredentialsToken(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := framework.PutWAL(t.Context(), s, walKindMintedToken, map[string]any{"access_token": tok.AccessToken}); err != nil {
		t.Fatal(err)
	}
	rollback := &logical.Request{Operation: logical.RollbackOperation, Storage: s, Data: map[string]any{}}
	if _, err := b.HandleRequest(t.Context(), rollback); err != nil {
		t.Fatal(err)
	}
	if !sv.Active(tok.AccessToken) {
		t.Fatal("a record younger than the rollback's minimum age was rolled back")
	}
	rollback.Data["immediate"] = true
	if resp, err := b.HandleRequest(t.Context(), rollback); err != nil || resp.IsError() {
		t.Fatalf("rollback: %v %v", err, resp)
	}
	if sv.Active(tok.AccessToken) {
		t.Fatal("the rollback left the orphan token live at ev.energy")
	}
	if wal, _ := framework.ListWAL(t.Context(), s); len(wal) != 0 {
		t.Fatalf("%d write-ahead records left after the rollback", len(wal))
	}
}

// BenchmarkClientCredentialsRead mints a token through the token path, in process against the
// stand-in; the floor is the same POST sent straight to the stand-in, so x-direct-post is what the
// engine costs around its call to ev.energy.
func BenchmarkClientCredentialsRead(b *testing.B) {
	be, s := newUnitBackend(b)
	newUnitStandin(b, be, s)
	cfg, _, err := be.config(context.Background(), s)
	if err != nil {
		b.Fatal(err)
	}
	post := clientcredentials.Config{ClientID: testClientID, ClientSecret: testClientSecret, TokenURL: cfg.BaseURL + "/o/token", AuthStyle: oauth2.AuthStyleInHeader}
	direct := context.WithValue(context.Background(), oauth2.HTTPClient, &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()})
	floor := timeEach(2000, func() {
		if _, err := post.Token(direct); err != nil {
			b.Fatal(err)
		}
	})
	req := &logical.Request{Operation: logical.ReadOperation, Path: "token", Storage: s}
	b.ReportAllocs()
	for b.Loop() {
		if resp, err := be.HandleRequest(context.Background(), req); err != nil || resp.IsError() {
			b.Fatal(err, resp)
		}
	}
	b.ReportMetric(float64(b.Elapsed()/time.Duration(b.N))/float64(floor), "x-direct-post")
}
