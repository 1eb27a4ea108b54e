package evenergy

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// heldTransport holds each call to ev.energy until released, telling held when one arrives.
type heldTransport struct {
	held, release chan struct{}
}

func (h heldTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	h.held <- struct{}{}
	<-h.release
	return http.DefaultTransport.RoundTrip(req)
}

// TestStepDownWaitsForImportInFlight: an import whose refresh is in flight as the node steps down
// stores the rotated grant before the step-down ends, so the next node loads it instead of the
// refresh token ev.energy no longer accepts (simulation seed 17); an import after it mints nothing.
func TestStepDownWaitsForImportInFlight(t *testing.T) {
	b, s := newUnitBackend(t)
	calls := heldTransport{held: make(chan struct{}), release: make(chan struct{})}
	b.transport = calls
	sv := newUnitStandin(t, b, s)
	imported, err := sv.IssueUserGrant(testClientID, "u", "vehicle:read")
	if err != nil {
		t.Fatal(err)
	}
	importDone := make(chan error, 1)
	go func() {
		_, err := request(t, b, s, logical.UpdateOperation, "users/u", map[string]any{"refresh_token": imported})
		importDone <- err
	}()
	<-calls.held // the import's refresh is sent

	cleaned := make(chan struct{})
	go func() {
		b.Cleanup(context.Background())
		close(cleaned)
	}()
	stopping := func() bool {
		b.grantCalls.mu.Lock()
		defer b.grantCalls.mu.Unlock()
		return b.grantCalls.stopped
	}
	// The step-down either waits for the import, which is held, or has ended without it.
	eventually(t, time.Minute, "the step-down waits for the import in flight", func() bool {
		select {
		case <-cleaned:
			t.Fatal("the step-down ended before the import in flight stored its grant")
		default:
		}
		return stopping()
	})
	close(calls.release)
	<-cleaned
	g, err := getJSON[grant](t.Context(), s, userPrefix+"u")
	if err != nil || g == nil {
		t.Fatalf("the step-down ended without the imported grant stored: %v", err)
	}
	if g.RefreshToken == imported || !sv.Active(g.RefreshToken) {
		t.Fatal("the stored grant is not the one the import's refresh rotated")
	}
	if err := <-importDone; err != nil {
		t.Fatalf("import: %v", err)
	}

	other, err := sv.IssueUserGrant(testClientID, "v", "vehicle:read")
	if err != nil {
		t.Fatal(err)
	}
	_, err = request(t, b, s, logical.UpdateOperation, "users/v", map[string]any{"refresh_token": other})
	if coded := logical.HTTPCodedError(nil); !errors.As(err, &coded) || coded.Code() != http.StatusServiceUnavailable {
		t.Fatalf("an import after the step-down: %v, want 503", err)
	}
	if !sv.Active(other) {
		t.Fatal("an import after the step-down rotated its token")
	}
}
