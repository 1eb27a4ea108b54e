package evenergy

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// TestAccRateLimitReachesTheClient checks, through a real Vault, that ev.energy's 429 arrives as a
// 429 with its Retry-After, where the mount lets that header through, and hands out no lease.
func TestAccRateLimitReachesTheClient(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.vault.SetMaxRetries(0) // the API client would wait out the Retry-After and try again
	if err := e.vault.Sys().TuneMount(e.mount, api.MountConfigInput{AllowedResponseHeaders: []string{"Retry-After"}}); err != nil {
		t.Fatal(err)
	}
	e.write(t, "config", map[string]any{"request_timeout": "20s"})
	// Longer than request_timeout, so the engine passes it on instead of waiting.
	e.standin.SetFault(standin.Fault{Kind: standin.FaultRateLimited, RetryAfter: 45 * time.Second})
	t.Cleanup(func() { e.standin.SetFault(standin.Fault{}) })

	resp, _ := e.rawRead(t, "token")
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "45" {
		t.Fatalf("got HTTP %d with Retry-After %q, want 429 with 45", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	e.wantReadError(t, "token", http.StatusTooManyRequests, "ev.energy is rate limiting the token request (HTTP 429): retry after 45s")

	e.standin.SetFault(standin.Fault{Kind: standin.FaultGarbage})
	_, err := e.vault.Logical().Read(e.path("token"))
	wantStatus(t, err, http.StatusBadGateway, "not an OAuth response")
	if strings.Contains(err.Error(), "<") {
		t.Fatalf("the error carries ev.energy's markup: %v", err)
	}
	e.wantLeases(t, "token", 0)
	if issued, _ := e.standin.Counts(); issued != 0 {
		t.Fatalf("%d tokens issued by faulted requests", issued)
	}
}
