package evenergy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// refreshPause is how long the background refresh waits between its rounds: a grant whose failed
// refresh holds the next attempt back is tried again in a later round.
const refreshPause = time.Second

// refreshDueTokens stores the rotated tokens storage refused before, and starts the background
// refresh of the held tokens whose refresh point has come, unless it is running; it returns the
// channel that gets the outcome of the refresh's first round, nil when it started none.
func (b *backend) refreshDueTokens(ctx context.Context, s logical.Storage, end time.Time) (<-chan error, error) {
	err := b.tokens.storeUnsaved(ctx, s)
	if loaded, loadErr := b.loadHeldTokens(ctx, s, end); !loaded || loadErr != nil {
		return nil, errors.Join(err, loadErr) // the tokens wait for the next pass, once they are loaded
	}
	cfg, client, cfgErr := b.config(ctx, s)
	if cfgErr != nil || ctx.Err() != nil {
		return nil, err // not configured, or the pass is over: nothing to refresh now
	}
	err = errors.Join(err, b.setAsideUnsharedTokens(ctx, s, cfg, client))
	if !b.refreshing.TryLock() {
		return nil, err // running: its next round finds what came due
	}
	firstRound := make(chan error, 1)
	go b.refreshInBackground(s, firstRound)
	return firstRound, err
}

// setAsideUnsharedTokens sets aside, now rather than when due, the shared tokens whose role no
// longer shares them (see heldTokenAt): a role write whose set-aside storage refused leaves one
// stored, which nothing else queues before its refresh point, hours away.
func (b *backend) setAsideUnsharedTokens(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient) error {
	var names []string
	b.tokens.walk(sharedTokenPrefix, func(name string, g *grant) {
		if g != nil {
			names = append(names, name)
		}
	})
	var errs []error
	for _, name := range names {
		if _, err := b.heldTokenAt(ctx, s, cfg, client, sharedTokenPrefix+name); err != nil {
			errs = append(errs, fmt.Errorf("setting aside the shared token of role %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// loadHeldTokens reads again the held tokens invalidated since they were cached (at most
// staleSlack), and reports whether memory then holds every one. When it holds none (the start-up
// load failed) it starts the load of every token in the background, unless it runs, and waits for
// it until end at most: Vault holds its state lock through the pass.
func (b *backend) loadHeldTokens(ctx context.Context, s logical.Storage, end time.Time) (bool, error) {
	if b.tokens.isLoaded() {
		err := b.tokens.loadAll(ctx, s)
		return err == nil, err
	}
	if !b.tokens.loadingAll.TryLock() {
		return false, nil // the start-up load, or one a pass started, runs
	}
	loaded := make(chan error, 1)
	go func() { loaded <- b.loadEveryHeldToken(s) }()
	timer := time.NewTimer(time.Until(end))
	defer timer.Stop()
	select {
	case err := <-loaded:
		return err == nil, err
	case <-timer.C:
	case <-ctx.Done():
	}
	return false, nil
}

// loadEveryHeldToken loads every held token into memory, until the mount stops on this node; call
// it holding b.tokens.loadingAll, which it lets go.
func (b *backend) loadEveryHeldToken(s logical.Storage) error {
	defer b.tokens.loadingAll.Unlock()
	err := b.tokens.loadAllLocked(b.loadingGrants, s)
	if err != nil && b.loadingGrants.Err() == nil {
		b.Logger().Error("could not load the held tokens; the next periodic pass tries again", "error", err)
	}
	return err
}

// awaitFirstRound waits for the background refresh's first round, for the pass to report it, until
// end or until ctx ends: Vault holds its state lock through the pass, while the refresh goes on at
// the pace of the call budget.
func awaitFirstRound(ctx context.Context, firstRound <-chan error, end time.Time) error {
	if firstRound == nil {
		return nil
	}
	timer := time.NewTimer(time.Until(end))
	defer timer.Stop()
	select {
	case err := <-firstRound:
		return err
	case <-timer.C:
	case <-ctx.Done():
	}
	return nil
}

// refreshInBackground refreshes the due held tokens in rounds, the earliest due first, until none is
// due or the mount stops on this node; it hands the first round's outcome to firstRound and logs
// the others'. Call it holding b.refreshing, which it lets go once it hands over nothing due.
func (b *backend) refreshInBackground(s logical.Storage, firstRound chan<- error) {
	ctx := b.background
	for round := 0; ; round++ {
		var keys []string
		cfg, client, err := b.config(ctx, s)
		if err == nil {
			err = b.refreshRound(ctx, s, cfg, client, b.tokens.due(cfg, b.tokens.refreshes.now()))
			keys = b.tokens.due(cfg, b.tokens.refreshes.now()) // what is left: failed, held back, or due meanwhile
		}
		if len(keys) == 0 || ctx.Err() != nil {
			b.refreshing.Unlock() // before the pass returns: the next one starts a refresh for what comes due
		}
		switch {
		case round == 0:
			firstRound <- err
		case err != nil:
			b.Logger().Warn("the background refresh of held tokens", "error", err)
		}
		if len(keys) == 0 || ctx.Err() != nil {
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

// refreshRound refreshes the held tokens at keys, refreshWorkers at a time, each call in its turn
// under the call budget, until ctx ends; it says how many it could not refresh, and why the first.
func (b *backend) refreshRound(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, keys []string) error {
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		failed   int
		firstErr error
		due      = make(chan string)
	)
	for range refreshWorkers {
		wg.Go(func() {
			for key := range due {
				// The round waits for the refresh it sent, or joined, to be stored: the next round
				// must not find it half done.
				err := b.refreshHeldIfDue(ctx, s, cfg, client, key)
				switch {
				case err == nil:
				// Revoked grants and those of another client wait for their user, not for the next round.
				case errors.As(err, new(*revokedGrantError)), errors.As(err, new(*otherClientError)):
				case ctx.Err() != nil && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)):
				default:
					mu.Lock()
					if failed++; firstErr == nil {
						firstErr = fmt.Errorf("%s: %w", key, err)
					}
					mu.Unlock()
				}
			}
		})
	}
	for _, key := range keys {
		if ctx.Err() != nil {
			break
		}
		due <- key
	}
	close(due)
	wg.Wait()
	if failed > 0 {
		return fmt.Errorf("%d of %d held tokens due for a refresh were not refreshed; the first: %w", failed, len(keys), firstErr)
	}
	return nil
}

// refreshHeldIfDue refreshes the held token at key if its refresh point has come (see refreshTokenIfDue).
func (b *backend) refreshHeldIfDue(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, key string) error {
	t, err := b.heldTokenAt(ctx, s, cfg, client, key)
	if t == nil {
		return err
	}
	return b.refreshTokenIfDue(ctx, cfg, t)
}
