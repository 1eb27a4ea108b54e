package evenergy

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

func TestUpstreamErrorPassesOnOAuthError(t *testing.T) {
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error": "invalid_client", "error_description": "Client authentication failed."}`))
	}))
	defer server.Close()
	client := testClient(&config{ClientID: "app", ClientSecret: "s3cret", BaseURL: server.URL, RequestTimeout: time.Second})

	for op, err := range map[string]error{
		"token request":    func() error { _, err := client.clientCredentialsToken(t.Context(), nil); return err }(),
		"token refresh":    func() error { _, err := client.refresh(t.Context(), "rt"); return err }(),
		"token revocation": client.revoke(t.Context(), "tok", ""),
	} {
		var upstream *upstreamError
		if !errors.As(err, &upstream) || upstream.Code() != http.StatusBadRequest ||
			err.Error() != "ev.energy refused the "+op+": invalid_client: Client authentication failed." {
			t.Errorf("%s: got %v", op, err)
		}
	}
}

func TestUpstreamErrorWhenEvenergyFails(t *testing.T) {
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "oops", http.StatusInternalServerError)
	}))
	client := testClient(&config{ClientID: "app", ClientSecret: "s3cret", BaseURL: server.URL, RequestTimeout: time.Second})
	err := client.revoke(t.Context(), "tok", "")
	if upstream, ok := err.(*upstreamError); !ok || upstream.Code() != http.StatusBadGateway || err.Error() != "ev.energy failed the token revocation with HTTP 500" {
		t.Errorf("HTTP 500: got %v", err)
	}
	server.Close()
	client = testClient(client.cfg) // without connections kept alive from before
	_, err = client.clientCredentialsToken(t.Context(), nil)
	if upstream, ok := err.(*upstreamError); !ok || upstream.Code() != http.StatusBadGateway || upstream.Fault != faultRefused {
		t.Errorf("unreachable: got %v", err)
	}
}

// TestProviderFaultsMapToOneAnswer reads token through a unit backend while the stand-in fails in
// each way ev.energy can; no fault may hand out a lease or leave a token alive.
func TestProviderFaultsMapToOneAnswer(t *testing.T) {
	cases := []struct {
		fault      standin.Fault
		status     int
		want       string
		retryAfter string
	}{
		{standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: 7 * time.Second}, http.StatusTooManyRequests, "rate limiting the token request (HTTP 429): retry after 7s", "7"},
		{standin.Fault{Kind: standin.FaultServerError}, http.StatusBadGateway, "ev.energy failed the token request with HTTP 500", ""},
		{standin.Fault{Kind: standin.FaultGarbage}, http.StatusBadGateway, "answered the token request with something that is not an OAuth response", ""},
		{standin.Fault{Kind: standin.FaultHang}, http.StatusBadGateway, "did not answer the token request within the config's request_timeout", ""},
		{standin.Fault{Kind: standin.FaultHangUp}, http.StatusBadGateway, "the connection to ev.energy failed during the token request", ""},
	}
	for _, tc := range cases {
		b, s := newUnitBackend(t)
		sv := newTestStandin()
		unitConfig(t, b, s, sv)
		if _, err := request(t, b, s, logical.UpdateOperation, "config", map[string]any{"request_timeout": "2s"}); err != nil {
			t.Fatal(err)
		}
		sv.SetFault(tc.fault)
		resp, err := request(t, b, s, logical.ReadOperation, "token", nil)
		var coded logical.HTTPCodedError
		switch {
		case !errors.As(err, &coded) || coded.Code() != tc.status || !strings.Contains(err.Error(), tc.want):
			t.Errorf("fault %d: want HTTP %d saying %q, got %v", tc.fault.Kind, tc.status, tc.want, err)
		case strings.Contains(err.Error(), "<"):
			t.Errorf("fault %d: the message carries markup: %v", tc.fault.Kind, err)
		case resp != nil && resp.Secret != nil:
			t.Errorf("fault %d: a lease was handed out", tc.fault.Kind)
		case tc.retryAfter != "" && (resp == nil || resp.Headers["Retry-After"][0] != tc.retryAfter):
			t.Errorf("fault %d: Retry-After not passed on: %v", tc.fault.Kind, resp)
		}
		if _, active := sv.Counts(); active != 0 {
			t.Errorf("fault %d: %d tokens alive at ev.energy", tc.fault.Kind, active)
		}
		sv.SetFault(standin.Fault{}) // releases a held request
	}
}

func TestRateLimitRetriedOnceWithinRequestTimeout(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	unitConfig(t, b, s, sv)
	sv.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: time.Second, Count: 1})
	if resp, err := request(t, b, s, logical.ReadOperation, "token", nil); err != nil || resp.Secret == nil {
		t.Fatalf("a 429 with a Retry-After that fits in request_timeout was not retried: %v", err)
	}
	sv.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: time.Second, Count: 2})
	if _, err := request(t, b, s, logical.ReadOperation, "token", nil); err == nil || !strings.Contains(err.Error(), "HTTP 429") {
		t.Fatalf("want one retry only, then the 429 passed on; got %v", err)
	}
	if issued, _ := sv.Counts(); issued != 1 {
		t.Fatalf("%d tokens issued, want 1", issued)
	}
}

// TestRateLimitNotRetriedPastTheCallsDeadline: work that sends no call after a time (a periodic
// pass's budget) leaves a 429 whose Retry-After ends later to its next pass (simulation seed 97).
func TestRateLimitNotRetriedPastTheCallsDeadline(t *testing.T) {
	b, s := newUnitBackend(t)
	sv := newTestStandin()
	unitConfig(t, b, s, sv)
	_, client, err := b.config(t.Context(), s)
	if err != nil {
		t.Fatal(err)
	}
	sv.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: time.Second, Count: 1})
	ctx := callsUntil(t.Context(), time.Now().Add(500*time.Millisecond))
	if _, err := client.clientCredentialsToken(ctx, nil); err == nil || !strings.Contains(err.Error(), "HTTP 429") {
		t.Fatalf("a 429 whose Retry-After ends past the calls' deadline was retried: %v", err)
	}
	if issued, _ := sv.Counts(); issued != 0 {
		t.Fatalf("%d tokens issued, want none", issued)
	}
	sv.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: time.Second, Count: 1})
	ctx = callsUntil(t.Context(), time.Now().Add(time.Minute))
	if _, err := client.clientCredentialsToken(ctx, nil); err != nil {
		t.Fatalf("a 429 whose Retry-After ends before the calls' deadline was not retried: %v", err)
	}
}

// TestNoRedirectIsFollowed points base_url at a stand-in that redirects every token and revocation
// request to a second listener: each call fails naming the status and the target's host, and the
// target never sees the client's credentials or tokens.
func TestNoRedirectIsFollowed(t *testing.T) {
	sv := newTestStandin()
	server := httptest.NewServer(sv)
	t.Cleanup(server.Close)
	var reached atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { reached.Add(1) }))
	t.Cleanup(target.Close)
	refresh, err := sv.IssueUserGrant(testClientID, "driver", "")
	if err != nil {
		t.Fatal(err)
	}
	sv.SetRedirect(target.URL)
	client := testClient(&config{ClientID: testClientID, ClientSecret: testClientSecret, BaseURL: server.URL, RequestTimeout: 5 * time.Second})

	for op, call := range map[string]func() error{
		opToken:   func() error { _, err := client.clientCredentialsToken(t.Context(), nil); return err },
		opRefresh: func() error { _, err := client.refresh(t.Context(), refresh); return err },
		opExchange: func() error {
			_, err := client.exchangeCode(t.Context(), "a-code", oauth2.GenerateVerifier(), appRedirect)
			return err
		},
		opRevoke: func() error { return client.revoke(t.Context(), refresh, "refresh_token") },
	} {
		err := call()
		want := "ev.energy answered the " + op + " with a redirect (HTTP 307) to " + strings.TrimPrefix(target.URL, "http://") + ", which the engine does not follow: check base_url"
		var upstream *upstreamError
		if !errors.As(err, &upstream) || upstream.Code() != http.StatusBadGateway || err.Error() != want {
			t.Errorf("%s: got %v, want a 502 saying %q", op, err, want)
		}
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("the redirect target received %d requests", n)
	}
	if !sv.Active(refresh) {
		t.Fatal("the refresh token was used or revoked")
	}
}

func TestRedirectWithoutLocation(t *testing.T) {
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusFound) }))
	t.Cleanup(server.Close)
	client := testClient(&config{ClientID: "app", ClientSecret: "s3cret", BaseURL: server.URL, RequestTimeout: time.Second})
	err := client.revoke(t.Context(), "tok", "")
	if err == nil || err.Error() != "ev.energy answered the token revocation with a redirect (HTTP 302) without a location, which the engine does not follow: check base_url" {
		t.Errorf("got %v", err)
	}
}

// testClient is an ev.energy client outside any backend, with metrics nobody reads.
func testClient(cfg *config) *evenergyClient {
	return newClient(cfg, newMetrics(func() map[string]int { return nil }, func() int { return 0 }, func() map[string]int { return nil }), nil)
}

// TestConcurrentMintsReuseConnections: waves of 16 concurrent mints, as 16 Vault clients make, dial
// ev.energy once per concurrent call, not again in every wave.
func TestConcurrentMintsReuseConnections(t *testing.T) {
	const concurrent, waves = 16, 3
	sv := newTestStandin()
	sv.SetLatency(20 * time.Millisecond) // so that a wave's calls overlap
	var dialed atomic.Int64
	server := httptest.NewUnstartedServer(sv)
	server.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateNew {
			dialed.Add(1)
		}
	}
	server.Start()
	t.Cleanup(server.Close)
	client := testClient(&config{ClientID: testClientID, ClientSecret: testClientSecret, BaseURL: server.URL, RequestTimeout: 30 * time.Second})
	for range waves {
		var wg sync.WaitGroup
		for range concurrent {
			wg.Go(func() {
				if _, err := client.clientCredentialsToken(t.Context(), nil); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
	}
	if n := dialed.Load(); n > concurrent {
		t.Fatalf("%d waves of %d concurrent mints dialed %d connections, want at most %d", waves, concurrent, n, concurrent)
	}
}

// TestRevocationIsConfirmedOnlyByAnEmpty200: ev.energy (oauthlib) confirms a revocation with a 200
// and an empty body, whatever the content type; a 200 with a body (a proxy's or maintenance page)
// confirms nothing, so the record stays queued and revocations says why.
func TestRevocationIsConfirmedOnlyByAnEmpty200(t *testing.T) {
	var page atomic.Bool
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		if page.Load() {
			w.Write([]byte("<html><body>Back soon: down for maintenance</body></html>"))
		}
	}))
	defer server.Close()
	client := testClient(&config{ClientID: "app", ClientSecret: "s3cret", BaseURL: server.URL, RequestTimeout: time.Second})
	if err := client.revoke(t.Context(), "tok", ""); err != nil {
		t.Fatalf("an empty 200 is ev.energy's confirmation: %v", err)
	}
	page.Store(true)
	const why = "ev.energy answered the token revocation with HTTP 200 and a body, which is not its confirmation (an empty body): check base_url"
	if err := client.revoke(t.Context(), "tok", ""); err == nil || err.Error() != why {
		t.Fatalf("a 200 with a page: got %v", err)
	}

	b, s := newUnitBackend(t)
	unitConfig(t, b, s, server.Config.Handler)
	if err := b.revokeOrQueue(t.Context(), s, revocation{ClientID: testClientID, AccessToken: "tok", Reason: reasonLeaseEnded}); err != nil {
		t.Fatal(err)
	}
	resp, err := request(t, b, s, logical.UpdateOperation, "revocations", nil)
	if err != nil || resp.Data["pending"] != 1 {
		t.Fatalf("after a retry answered by a page: %v %v, want the record still queued", resp, err)
	}
	if c := resp.Data["clients"].(map[string]any)[testClientID].(*clientRevocations); c.LastError != why {
		t.Fatalf("revocations shows last_error %q, want %q", c.LastError, why)
	}
}
