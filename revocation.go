package evenergy

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// revocationPrefix keeps, seal-wrapped, what must still die at ev.energy: revocation is the
// engine's job until ev.energy confirms it, however long ev.energy is down.
const revocationPrefix = "revocations/"

// Why a token is to be revoked, as the revocations path names it.
const (
	reasonLeaseEnded     = "lease_ended"     // Vault ended a client-credentials lease
	reasonUnowned        = "unowned"         // minted, but no lease or stored grant owns it
	reasonReplacedGrant  = "replaced_grant"  // the user connected again; revoked once its leases end
	reasonDeletedUser    = "deleted_user"    // the operator deleted the user's grant
	reasonUnconfirmed    = "unconfirmed"     // held for a link's maker, who did not confirm it in time or in few enough attempts
	reasonReplacedShared = "replaced_shared" // a shared role's token was replaced; revoked once its leases end
	reasonRevokedShared  = "revoked_shared"  // the operator ended a shared role's token, or deleted the role
)

// Retries of a client's revocations back off exponentially up to revocationMaxBackoff.
const (
	revocationMinBackoff = time.Second
	revocationMaxBackoff = 60 * time.Second
)

// revocation is one token pair (or a single token) that must be revoked at ev.energy by ClientID.
type revocation struct {
	ClientID     string    `json:"client_id"` // "" in records of leases from before leases recorded their client
	AccessToken  string    `json:"access_token,omitempty"`
	RefreshToken string    `json:"refresh_token,omitempty"`
	ExpiresAt    time.Time `json:"expires_at"` // the access token's expiry; zero when unknown
	NotBefore    time.Time `json:"not_before"` // leases handed out from a replaced grant run until then
	Reason       string    `json:"reason"`
	QueuedAt     time.Time `json:"queued_at"`
}

// expired reports whether nothing of the record can be alive any more: ev.energy's refresh tokens
// do not expire, so only a record of an access token alone with a known expiry can.
func (r *revocation) expired(now time.Time) bool {
	return r.RefreshToken == "" && !r.ExpiresAt.IsZero() && now.After(r.ExpiresAt)
}

// revokeWith revokes the record's tokens as client, the refresh token first (which ends its access
// token too at ev.energy); what it revoked is cleared from the record, so a retry sends only the rest.
func (r *revocation) revokeWith(ctx context.Context, client *evenergyClient) error {
	if r.RefreshToken != "" {
		if err := client.revoke(ctx, r.RefreshToken, "refresh_token"); err != nil {
			return err
		}
		r.RefreshToken = ""
	}
	if r.AccessToken != "" {
		if err := client.revoke(ctx, r.AccessToken, "access_token"); err != nil {
			return err
		}
		r.AccessToken = ""
	}
	return nil
}

// revocations are the pending records, with each client's retry state; that state lives in memory
// only, as a record is written when queued, never per attempt.
type revocations struct {
	*prefixCache[revocation]

	mu      sync.Mutex
	clients map[string]*clientRetry
}

// clientRetry is how the revocations of one client are failing: one failure backs off all of
// that client's records, so a down ev.energy gets one call per client per step.
type clientRetry struct {
	failures  int
	nextTry   time.Time
	lastError string
	failedAt  time.Time
}

func newRevocations() *revocations {
	return &revocations{prefixCache: newPrefixCache[revocation](revocationPrefix), clients: map[string]*clientRetry{}}
}

// failed notes a failed attempt for clientID and sets its next attempt.
func (q *revocations) failed(clientID string, err error, now time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	r := q.clients[clientID]
	if r == nil {
		r = &clientRetry{}
		q.clients[clientID] = r
	}
	r.nextTry = now.Add(min(revocationMinBackoff<<min(r.failures, 6), revocationMaxBackoff))
	r.failures++
	r.lastError, r.failedAt = err.Error(), now
}

func (q *revocations) succeeded(clientID string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.clients, clientID)
}

// waiting reports whether clientID's revocations back off at now.
func (q *revocations) waiting(clientID string, now time.Time) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	r := q.clients[clientID]
	return r != nil && now.Before(r.nextTry)
}

// revokeOrQueue revokes rec's tokens now, as the client that minted them; when ev.energy does not
// confirm, the record is queued for the periodic pass. Only a record that cannot be written fails.
func (b *backend) revokeOrQueue(ctx context.Context, s logical.Storage, rec revocation) error {
	return b.revokeInTurnOrQueue(ctx, s, rec, urgentRevocation())
}

// revokeInTurnOrQueue is revokeOrQueue in turn under the call budget; without a turn, rec is queued.
func (b *backend) revokeInTurnOrQueue(ctx context.Context, s logical.Storage, rec revocation, turn *budgetTurn) error {
	rec.ClientID = b.recordClient(ctx, s, rec.ClientID)
	if b.revocations.waiting(rec.ClientID, time.Now()) {
		return b.queueRevocation(ctx, s, rec, nil) // ev.energy failed this client just now: no call per lease
	}
	switch err := b.revokeRecord(ctx, s, &rec, turn); {
	case err == nil:
		return nil
	case errors.Is(err, errNoTurn) || errors.Is(err, errBudgetClosed):
		return b.queueRevocation(ctx, s, rec, nil) // no call went: nothing failed at ev.energy
	default:
		return b.queueRevocation(ctx, s, rec, err)
	}
}

// recordClient is the client a new record names: clientID, or for a lease or grant from before
// v0.3 the client recorded for those; "" while unknown, which the retry resolves again.
func (b *backend) recordClient(ctx context.Context, s logical.Storage, clientID string) string {
	named, _, err := b.namedClient(ctx, s, clientID)
	if err != nil {
		return clientID
	}
	return named
}

// revokeRecord revokes what rec holds as its client, in its turn under the call budget.
func (b *backend) revokeRecord(ctx context.Context, s logical.Storage, rec *revocation, turn *budgetTurn) error {
	client, err := b.clientFor(ctx, s, rec.ClientID)
	if err != nil {
		return err
	}
	if err := b.awaitTurn(ctx, client.cfg, rec.calls(), turn); err != nil {
		return err
	}
	return rec.revokeWith(ctx, client)
}

// urgentRevocation is the turn of a revocation that someone waits for: it goes before the
// background pass's calls.
func urgentRevocation() *budgetTurn { return &budgetTurn{call: callRevocation, urgent: true} }

// calls is how many calls to ev.energy revoking the record takes: one per token it holds.
func (r *revocation) calls() int {
	n := 0
	for _, token := range []string{r.RefreshToken, r.AccessToken} {
		if token != "" {
			n++
		}
	}
	return max(n, 1)
}

// queueRevocation stores rec for the periodic pass to revoke; cause is why it was not revoked now.
func (b *backend) queueRevocation(ctx context.Context, s logical.Storage, rec revocation, cause error) error {
	return b.queueRevocationAt(ctx, s, rand.Text(), rec, cause)
}

// queueRevocationAt is queueRevocation under key in the queue, which the caller may delete.
func (b *backend) queueRevocationAt(ctx context.Context, s logical.Storage, key string, rec revocation, cause error) error {
	rec.ClientID = b.recordClient(ctx, s, rec.ClientID)
	rec.QueuedAt = time.Now().UTC()
	if cause != nil {
		b.revocations.failed(rec.ClientID, cause, rec.QueuedAt)
		b.Logger().Warn("ev.energy did not confirm a revocation: queued, and retried until it does", "client_id", rec.ClientID, "reason", rec.Reason, "error", cause)
	}
	if err := b.revocations.put(context.WithoutCancel(ctx), s, key, &rec); err != nil {
		b.Logger().Error("a token to revoke at ev.energy could not be queued", "client_id", rec.ClientID, "reason", rec.Reason, "error", err)
		return errors.Join(cause, err)
	}
	return nil
}

// retryRevocations revokes the queued records that are due, until ctx ends or deadline passes:
// those whose client is not backing off, or every one when force is set (an operator asked), and
// with early set those deferred until their leases end too; early counts those it revoked.
func (b *backend) retryRevocations(ctx context.Context, s logical.Storage, deadline time.Time, force, early bool) (revokedEarly int, err error) {
	records, err := b.revocations.all(ctx, s)
	if err != nil {
		return 0, err
	}
	keys := make([]string, 0, len(records))
	for key := range records {
		keys = append(keys, key)
	}
	sort.Slice(keys, func(i, j int) bool { return records[keys[i]].QueuedAt.Before(records[keys[j]].QueuedAt) })
	var errs []error
	failedNow := map[string]bool{}       // clients whose ev.energy call failed in this pass: the rest of theirs waits
	record := context.WithoutCancel(ctx) // what ev.energy answered is stored even when an operator's retry is interrupted
	for _, key := range keys {
		now := time.Now()
		rec := *records[key]
		if ctx.Err() != nil || now.After(deadline) {
			break // the rest waits for the next pass
		}
		deferred := now.Before(rec.NotBefore)
		switch {
		case deferred && !early:
			continue
		case rec.expired(now):
			errs = append(errs, b.revocations.delete(record, s, key))
			continue
		case failedNow[rec.ClientID] || (!force && b.revocations.waiting(rec.ClientID, now)):
			continue
		}
		// An operator's retry (force) goes before the background pass's calls.
		if err := b.revokeRecord(ctx, s, &rec, &budgetTurn{call: callRevocation, by: deadline, urgent: force}); err != nil {
			if errors.Is(err, errNoTurn) || errors.Is(err, errBudgetClosed) || ctx.Err() != nil {
				break // no turn under the call budget before the pass ended: the rest waits for the next pass
			}
			failedNow[rec.ClientID] = true
			b.revocations.failed(rec.ClientID, err, now)
			if rec != *records[key] { // part of it was revoked: keep only the rest
				errs = append(errs, b.revocations.put(record, s, key, &rec))
			}
			continue
		}
		b.revocations.succeeded(rec.ClientID)
		errs = append(errs, b.revocations.delete(record, s, key))
		if deferred {
			revokedEarly++
		}
	}
	return revokedEarly, errors.Join(errs...)
}

// dropRevocations deletes, unrevoked, every queued record of clientID, and says what they held.
func (b *backend) dropRevocations(ctx context.Context, s logical.Storage, clientID string) (warning string, err error) {
	records, err := b.revocations.all(ctx, s)
	if err != nil {
		return "", err
	}
	var dropped, refreshTokens int
	var accessUntil time.Time
	for key, rec := range records {
		if rec.ClientID != clientID {
			continue
		}
		if err := b.revocations.delete(ctx, s, key); err != nil {
			return "", err
		}
		dropped++
		if rec.RefreshToken != "" {
			refreshTokens++
		}
		if rec.AccessToken != "" && rec.ExpiresAt.After(accessUntil) {
			accessUntil = rec.ExpiresAt
		}
	}
	if dropped == 0 {
		return "", nil
	}
	b.revocations.succeeded(clientID)
	b.Logger().Warn("dropped queued revocations unrevoked, at an operator's request", "client_id", clientID, "records", dropped)
	warning = fmt.Sprintf("dropped %d queued revocations of client %q without revoking them:", dropped, clientID)
	if refreshTokens > 0 {
		warning += fmt.Sprintf(" %d refresh tokens, which never expire at ev.energy, stay valid until revoked there;", refreshTokens)
	}
	if !accessUntil.IsZero() {
		warning += fmt.Sprintf(" access tokens stay valid until %s at the latest;", accessUntil.UTC().Format(time.RFC3339))
	} else if refreshTokens < dropped {
		warning += " access tokens of unknown expiry stay valid until they expire (at most 10 hours);"
	}
	return strings.TrimSuffix(warning, ";") + ". Revoke them in the ev.energy application if you can.", nil
}

// clientRevocations is what the revocations path shows of one client's pending records.
type clientRevocations struct {
	Pending        int    `json:"pending"`
	OldestQueuedAt string `json:"oldest_queued_at"`
	OldestAge      int64  `json:"oldest_age_seconds"`
	LastError      string `json:"last_error"`
	LastErrorAt    string `json:"last_error_at,omitempty"`
	NextAttemptAt  string `json:"next_attempt_at,omitempty"`
}

// revocationSummary counts the pending records by client, with no token values.
func (b *backend) revocationSummary(ctx context.Context, s logical.Storage) (map[string]any, error) {
	records, err := b.revocations.all(ctx, s)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	oldest := map[string]time.Time{}
	byClient := map[string]*clientRevocations{}
	for _, rec := range records {
		c := byClient[rec.ClientID]
		if c == nil {
			c = &clientRevocations{}
			byClient[rec.ClientID] = c
		}
		c.Pending++
		if at, seen := oldest[rec.ClientID]; !seen || rec.QueuedAt.Before(at) {
			oldest[rec.ClientID] = rec.QueuedAt
		}
	}
	b.revocations.mu.Lock()
	for id := range b.revocations.clients { // failing with nothing queued: a retired client refused by the revoke path
		if byClient[id] == nil {
			byClient[id] = &clientRevocations{}
		}
	}
	clients := map[string]any{}
	for id, c := range byClient {
		if c.Pending > 0 {
			c.OldestQueuedAt = oldest[id].Format(time.RFC3339)
			c.OldestAge = int64(now.Sub(oldest[id]).Seconds())
		}
		if r := b.revocations.clients[id]; r != nil {
			c.LastError, c.LastErrorAt = r.lastError, r.failedAt.UTC().Format(time.RFC3339)
			c.NextAttemptAt = r.nextTry.UTC().Format(time.RFC3339)
		}
		clients[id] = c
	}
	b.revocations.mu.Unlock()
	return map[string]any{"pending": len(records), "clients": clients}, nil
}

// revokeAfterLeases queues the revocation of replaced tokens until rec.NotBefore, by which the
// leases handed out for them end.
func (b *backend) revokeAfterLeases(ctx context.Context, s logical.Storage, rec revocation) {
	if err := b.queueRevocation(ctx, s, rec, nil); err != nil {
		b.disown(ctx, s, rec) // better end the readers' leases early than leave the tokens alive
	}
}

// disown revokes tokens that nothing in Vault owns, now or through the queue; when neither the call
// budget nor the queue takes them (a step-down closes the one as storage refuses the other), with one
// call outside the budget, as a step-down's settleUnsaved does.
func (b *backend) disown(ctx context.Context, s logical.Storage, rec revocation) {
	rec.NotBefore = time.Time{}
	ctx = context.WithoutCancel(ctx)
	err := b.revokeOrQueue(ctx, s, rec)
	if err == nil {
		return
	}
	if outside := b.revokeOutsideBudget(ctx, s, rec); outside != nil {
		b.Logger().Error("ev.energy tokens that Vault does not own could not be revoked nor queued", "client_id", rec.ClientID, "reason", rec.Reason, "error", errors.Join(err, outside))
	}
}

// revokeOutsideBudget revokes what rec holds as its client, with no turn under the call budget.
func (b *backend) revokeOutsideBudget(ctx context.Context, s logical.Storage, rec revocation) error {
	client, err := b.clientFor(ctx, s, rec.ClientID)
	if err != nil {
		return err
	}
	return rec.revokeWith(ctx, client)
}
