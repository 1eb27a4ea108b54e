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

// refreshWorkers bounds how many refreshes the background refresh sends to ev.energy at once.
const refreshWorkers = 16

// passBudget is how long a periodic pass goes on starting revocations, deleting expired pending
// authorizations, and waits for the background refresh's first round. Vault holds its state lock
// through the pass, so a step-down or a seal waits for it: the calls already sent finish (within
// request_timeout), and the rest wait for the next pass.
const passBudget = 2 * time.Second

// periodic runs every minute on the active node only: it forgets expired pending authorizations,
// queues the revocation of unconfirmed grants nobody claimed in time, retries queued revocations,
// starts the background refresh of the user tokens due for a refresh and forgets retired clients
// of which nothing is left. What is due is known from memory, so a pass with nothing to do reads
// no storage.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if b.ensureWritable() != nil {
		return nil
	}
	return errors.Join(
		b.forgetExpiredAuthorizations(ctx, req.Storage),
		b.revokeUnclaimedGrants(ctx, req.Storage),
		b.retryRevocationsInPass(ctx, req.Storage),
		b.refreshDueUsers(ctx, req.Storage),
		b.replaceDueSharedTokens(ctx, req.Storage),
		b.forgetSpentClients(ctx, req.Storage, time.Now()),
	)
}

// retryRevocationsInPass retries the queued records that are due, within the pass's budget.
func (b *backend) retryRevocationsInPass(ctx context.Context, s logical.Storage) error {
	_, err := b.retryRevocations(ctx, s, time.Now().Add(passBudget), false, false)
	return err
}

// refreshPause is how long the background refresh waits between its rounds: a grant whose failed
// refresh holds the next attempt back is tried again in a later round.
const refreshPause = time.Second

// refreshDueUsers stores the rotated grants storage refused before, and starts the background
// refresh of the grants whose refresh point has come, unless it is running.
// The pass waits for its first round, up to passBudget or until ctx ends: Vault holds its state
// lock through the pass, while the refresh goes on at the pace of the call budget.
func (b *backend) refreshDueUsers(ctx context.Context, s logical.Storage) error {
	if err := b.loadGrants(ctx, s); errors.Is(err, errGrantsLoading) {
		return nil // the grants wait for the next pass, once the start-up load is over
	} else if err != nil {
		return err
	}
	errs := []error{b.storeUnsavedGrants(ctx, s)}
	if _, _, err := b.config(ctx, s); err != nil || ctx.Err() != nil {
		return errs[0] // not configured, or the pass is over: nothing to refresh now
	}
	if !b.refreshing.TryLock() {
		return errs[0] // running: its next round finds what came due
	}
	firstRound := make(chan error, 1)
	go b.refreshInBackground(s, firstRound)
	select {
	case err := <-firstRound:
		errs = append(errs, err)
	case <-time.After(passBudget):
	case <-ctx.Done():
	}
	return errors.Join(errs...)
}

// refreshInBackground refreshes the due grants in rounds, the earliest due first, until none is
// due or the mount stops on this node; it hands the first round's outcome to firstRound and logs
// the others'. Call it holding b.refreshing, which it lets go once it hands over nothing due.
func (b *backend) refreshInBackground(s logical.Storage, firstRound chan<- error) {
	ctx := b.background
	for round := 0; ; round++ {
		var users []string
		cfg, client, err := b.config(ctx, s)
		if err == nil {
			err = b.refreshRound(ctx, s, cfg, client, b.dueUsers(cfg, b.cache.refreshes.now()))
			users = b.dueUsers(cfg, b.cache.refreshes.now()) // what is left: failed, held back, or due meanwhile
		}
		if len(users) == 0 || ctx.Err() != nil {
			b.refreshing.Unlock() // before the pass returns: the next one starts a refresh for what comes due
		}
		switch {
		case round == 0:
			firstRound <- err
		case err != nil:
			b.Logger().Warn("the background refresh of users' tokens", "error", err)
		}
		if len(users) == 0 || ctx.Err() != nil {
			return
		}
		select {
		case <-b.budget.after(refreshPause):
		case <-ctx.Done():
			b.refreshing.Unlock()
			return
		}
	}
}

// refreshRound refreshes the users' grants, refreshWorkers at a time, each call in its turn under
// the call budget, until ctx ends; it says how many it could not refresh, and why the first.
func (b *backend) refreshRound(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, users []string) error {
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		failed   int
		firstErr error
		due      = make(chan string)
	)
	for range refreshWorkers {
		wg.Go(func() {
			for user := range due {
				// The round waits for the refresh it sent, or joined, to be stored: the next round
				// must not find it half done.
				err := b.refreshIfDue(ctx, s, cfg, client, user)
				switch {
				case err == nil:
				// Revoked grants and those of another client wait for their user, not for the next round.
				case errors.As(err, new(*revokedGrantError)), errors.As(err, new(*otherClientError)):
				case ctx.Err() != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)):
				default:
					mu.Lock()
					if failed++; firstErr == nil {
						firstErr = fmt.Errorf("user %s: %w", user, err)
					}
					mu.Unlock()
				}
			}
		})
	}
	for _, user := range users {
		if ctx.Err() != nil {
			break
		}
		due <- user
	}
	close(due)
	wg.Wait()
	if failed > 0 {
		return fmt.Errorf("%d of %d users due for a refresh were not refreshed; the first: %w", failed, len(users), firstErr)
	}
	return nil
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

// forgetExpiredAuthorizations deletes pending authorizations nobody came back for in time, until
// passBudget or ctx ends; the next pass goes on from there.
func (b *backend) forgetExpiredAuthorizations(ctx context.Context, s logical.Storage) error {
	return b.sweepPending(ctx, s, time.Now().Add(passBudget))
}
