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

// passBudget is how long a periodic pass goes on starting calls to ev.energy, for refreshes and
// for revocations each. Vault holds its state lock through the pass, so a step-down or a seal waits
// for it: the calls already sent finish (within request_timeout), and the rest wait for the next pass.
const passBudget = 2 * time.Second

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
		b.retryRevocations(ctx, req.Storage, time.Now().Add(passBudget), false),
		b.refreshDueUsers(ctx, req.Storage),
		b.forgetSpentClients(ctx, req.Storage, time.Now()),
	)
}

// refreshDueUsers stores the rotated grants storage refused before, then refreshes, a few at a
// time, the grants whose refresh point has come, until passBudget or ctx ends.
func (b *backend) refreshDueUsers(ctx context.Context, s logical.Storage) error {
	// By the clock, not a context's timer: a late timer would let a worker start a second wave.
	deadline := time.Now().Add(passBudget)
	startable := func() bool { return ctx.Err() == nil && time.Now().Before(deadline) }
	if err := b.loadGrants(ctx, s); errors.Is(err, errGrantsLoading) {
		return nil // the grants wait for the next pass, once the start-up load is over
	} else if err != nil {
		return err
	}
	errs := []error{b.storeUnsavedGrants(ctx, s)}
	cfg, client, err := b.config(ctx, s)
	if err != nil {
		return errs[0] // not configured: nothing can be refreshed
	}
	var (
		mu  sync.Mutex
		wg  sync.WaitGroup
		due = make(chan string)
	)
	for range refreshWorkers {
		wg.Go(func() {
			for user := range due {
				if !startable() {
					continue // handed over as the budget ran out
				}
				// The pass waits for the refresh it sent, or joined, to be stored: the next pass must
				// not find it half done.
				err := b.refreshIfDue(ctx, s, cfg, client, user)
				switch {
				case err == nil:
				// Revoked grants and those of another client wait for their user, not for the next pass.
				case errors.As(err, new(*revokedGrantError)), errors.As(err, new(*otherClientError)):
				case ctx.Err() != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)):
				default:
					mu.Lock()
					errs = append(errs, fmt.Errorf("user %s: %w", user, err))
					mu.Unlock()
				}
			}
		})
	}
	for _, user := range b.dueUsers(cfg, b.cache.refreshes.now()) {
		if !startable() {
			break
		}
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

// dueUsers lists, from memory, the users whose active grant of this client reached its refresh
// point, the earliest first.
func (b *backend) dueUsers(cfg *config, now time.Time) []string {
	b.cache.mu.Lock()
	defer b.cache.mu.Unlock()
	return b.cache.schedule.due(b.cache.grants, cfg, now)
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
