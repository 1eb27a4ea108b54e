package evenergy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// refreshWorkers bounds how many refreshes one periodic pass sends to ev.energy at once.
const refreshWorkers = 16

// periodic runs every minute on the active node only: it refreshes every user token due for a
// refresh and forgets expired pending authorizations. What is due is known from memory, so a pass
// with nothing to do reads no storage.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if b.ensureWritable() != nil {
		return nil
	}
	return errors.Join(b.forgetExpiredAuthorizations(ctx, req.Storage), b.refreshDueUsers(ctx, req.Storage))
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
	if err := b.storeUnsavedGrants(ctx, s); err != nil {
		errs = append(errs, err)
	}
	for range refreshWorkers {
		wg.Go(func() {
			for user := range due {
				// Revoked grants and those of another client wait for their user, not for the next pass.
				if _, _, err := b.currentGrant(ctx, s, cfg, client, user); err != nil && !errors.As(err, new(*revokedGrantError)) && !errors.As(err, new(*otherClientError)) {
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

// storeUnsavedGrants stores the rotated grants that storage refused before, which until then live
// only in this node's memory.
func (b *backend) storeUnsavedGrants(ctx context.Context, s logical.Storage) error {
	b.cache.mu.RLock()
	users := slices.Collect(maps.Keys(b.cache.unsaved))
	b.cache.mu.RUnlock()
	var errs []error
	for _, user := range users {
		if err := b.storeUnsavedGrant(ctx, s, user); err != nil {
			errs = append(errs, fmt.Errorf("storing the rotated grant of user %s: %w", user, err))
		}
	}
	return errors.Join(errs...)
}

func (b *backend) storeUnsavedGrant(ctx context.Context, s logical.Storage, user string) error {
	defer b.lockUser(user)()
	b.cache.mu.RLock()
	g, unsaved := b.cache.grants[user], b.cache.unsaved[user]
	b.cache.mu.RUnlock()
	if !unsaved {
		return nil // stored meanwhile, by a refresh, a new authorization or a delete
	}
	return b.putGrant(ctx, s, user, g)
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
