package evenergy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// refreshWorkers bounds how many refreshes one periodic pass sends to ev.energy at once.
const refreshWorkers = 16

// periodic runs every minute on the active node only: it forgets expired pending authorizations,
// retries queued revocations, refreshes every user token due for a refresh and forgets retired
// clients of which nothing is left. What is due is known from memory, so a pass
// with nothing to do reads no storage.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if b.ensureWritable() != nil {
		return nil
	}
	return errors.Join(
		b.forgetExpiredAuthorizations(ctx, req.Storage),
		b.retryRevocations(ctx, req.Storage, time.Now().Add(revocationPassBudget), false),
		b.refreshDueUsers(ctx, req.Storage),
		b.forgetSpentClients(ctx, req.Storage, time.Now()),
	)
}

// refreshDueUsers refreshes, a few at a time, the grants whose access token is inside the refresh window.
func (b *backend) refreshDueUsers(ctx context.Context, s logical.Storage) error {
	if err := b.loadGrants(ctx, s); err != nil {
		return err
	}
	cfg, client, err := b.config(ctx, s)
	if err != nil {
		return nil // not configured: nothing can be refreshed
	}
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
		due  = make(chan string)
	)
	for range refreshWorkers {
		wg.Go(func() {
			for user := range due {
				// Revoked grants and those of another client wait for their user, not for the next pass.
				if _, err := b.currentGrant(ctx, s, cfg, client, user); err != nil && !errors.As(err, new(*revokedGrantError)) && !errors.As(err, new(*otherClientError)) {
					mu.Lock()
					errs = append(errs, fmt.Errorf("user %s: %w", user, err))
					mu.Unlock()
				}
			}
		})
	}
	for _, user := range b.dueUsers(cfg, time.Now()) {
		due <- user
	}
	close(due)
	wg.Wait()
	return errors.Join(errs...)
}

// dueUsers lists, from memory, the users whose active grant of this client entered the refresh
// window unattended: an active reader has refreshed it already.
func (b *backend) dueUsers(cfg *config, now time.Time) []string {
	b.cache.mu.RLock()
	defer b.cache.mu.RUnlock()
	var users []string
	for user, g := range b.cache.grants {
		if g.usable(cfg, user) == nil && g.unattended(cfg, now) {
			users = append(users, user)
		}
	}
	return users
}

// forgetExpiredAuthorizations deletes pending authorizations nobody came back for in time.
func (b *backend) forgetExpiredAuthorizations(ctx context.Context, s logical.Storage) error {
	if err := b.loadPending(ctx, s); err != nil {
		return err
	}
	b.cache.mu.RLock()
	var expired []string
	for state, expiresAt := range b.cache.pending {
		if time.Now().After(expiresAt) {
			expired = append(expired, state)
		}
	}
	b.cache.mu.RUnlock()
	var errs []error
	for _, state := range expired {
		errs = append(errs, b.deletePending(ctx, s, state))
	}
	return errors.Join(errs...)
}
