package evenergy

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// heldToken is a token the engine holds and rotates, a user's grant or a shared role's token: one
// set of rules serves both (a lease until its refresh point, refreshAt; one refresh in flight; backoff).
type heldToken interface {
	key() string                                 // its storage key, and its entry in refreshes
	describe() string                            // whose token it is, for errors
	current(ctx context.Context) (*grant, error) // the token held now, or why none can be given
	renew(ctx context.Context) (*grant, error)   // refreshes it if still due, with refresh's outcomes
}

// currentToken returns the held token and how long a reader may keep it (its lease): until its
// refresh point, so that no refresh kills the token while the lease lives. A token well before its
// point comes from memory without a lock. A read within readAhead of the point waits for it and
// then for the refresh, sent by one call at a time, which every reader arriving meanwhile waits
// for; after a passing failure the token's next attempt is its new point, and readers get the
// still-valid token until then. The refresh takes its turn under the call budget before the
// background's.
func (b *backend) currentToken(ctx context.Context, cfg *config, t heldToken) (*grant, time.Duration, error) {
	for {
		now := b.tokens.refreshes.now()
		g, err := t.current(ctx)
		if err != nil {
			return nil, 0, err
		}
		at := g.refreshAt(cfg)
		if g.ExpiresAt.Before(at) && now.Before(at) {
			// A refresh failed after the token expired, and the next attempt is not due yet.
			return nil, 0, b.tokens.refreshes.failure(t, g, at)
		}
		if now.Before(at.Add(-readAhead)) {
			return g, at.Sub(now).Truncate(time.Second), nil
		}
		// Only a node that can write may refresh, or the rotated refresh token would be lost.
		if err := b.ensureWritable(); err != nil {
			return nil, 0, err
		}
		if now.Before(at) {
			if err := b.tokens.refreshes.waitUntil(ctx, at); err != nil {
				return nil, 0, err
			}
		}
		next, err := b.joinRefresh(ctx, cfg, t, g, true)
		now = b.tokens.refreshes.now()
		switch {
		case next == nil:
			return nil, 0, err
		case err == nil && next.AccessToken != g.AccessToken:
			// A fresh token is answered at once; only one living under 2*readAhead could have its point
			// that close, and Vault reads a TTL of 0 as the mount's default.
			return next, max(next.refreshAt(cfg).Sub(now).Truncate(time.Second), time.Second), nil
		case err != nil && (next.ExpiresAt.Sub(now) < readAhead || !next.refreshAt(cfg).After(at)):
			return nil, 0, err // the token is about to expire, or no next attempt could be stored: nothing to promise
		}
		// Not refreshed: the token's point lies ahead, so the next round leases until it or waits for it.
	}
}

// refreshTokenIfDue refreshes the held token if its refresh point has come, for the periodic pass,
// which neither waits for a point nor tries again. A passing failure is no error while the token
// still serves: its next attempt is stored with it.
func (b *backend) refreshTokenIfDue(ctx context.Context, cfg *config, t heldToken) error {
	g, err := t.current(ctx)
	if err != nil || b.tokens.refreshes.now().Before(g.refreshAt(cfg)) {
		return err
	}
	next, err := b.joinRefresh(ctx, cfg, t, g, false)
	disownUnclaimed(ctx, err) // the pass hands out no lease
	if next != nil && next.ExpiresAt.Sub(b.tokens.refreshes.now()) >= readAhead {
		return nil
	}
	return err
}

// joinRefresh sends the refresh of the held token g, whose point has come, or joins the one in
// flight, and returns its outcome as renew does; while the last failure holds attempts back, the
// current token, whose point is that failure's next attempt if storage took it, and the failure.
// A reader's refresh (reader set) takes its turn under the call budget before the background's.
func (b *backend) joinRefresh(ctx context.Context, cfg *config, t heldToken, g *grant, reader bool) (*grant, error) {
	f, start, held := b.tokens.refreshes.join(t.key(), g.RefreshToken, b.tokens.refreshes.now())
	if held != nil {
		current, err := t.current(ctx)
		if err != nil {
			return nil, err
		}
		return current, held.err
	}
	if reader {
		b.budget.hurry(f.turn)
	}
	if start {
		// The flight is every waiting reader's, and once sent the refresh must reach storage (the
		// old token is dead then): it goes on if its starter goes away.
		detached := context.WithoutCancel(ctx)
		b.tokens.refreshes.fly(t.key(), f, func() (*grant, error) {
			if err := b.awaitTurn(detached, cfg, 1, f.turn); err != nil {
				return g, err // no call went: the token still serves until its point
			}
			return t.renew(detached)
		})
	}
	select {
	case <-f.done:
		return f.g, f.err
	case <-ctx.Done():
		if start {
			disownUnclaimed(ctx, f.err) // the flight landed (fly returns when it does), and no reader is left to take it
		}
		return nil, ctx.Err()
	}
}

// heldTokenAt is the held token stored at key for the background refresh; nil for a shared role's
// token whose role no longer shares it: left behind by a write whose set-aside failed, it is queued
// for revocation once its leases end and forgotten here, so that it no longer comes due.
func (b *backend) heldTokenAt(ctx context.Context, s logical.Storage, cfg *config, client *evenergyClient, key string) (heldToken, error) {
	if user, ok := strings.CutPrefix(key, userPrefix); ok {
		return userToken{b, s, cfg, client, user}, nil
	}
	name := strings.TrimPrefix(key, sharedTokenPrefix)
	r, err := b.role(ctx, s, name)
	switch {
	case errors.As(err, new(logical.HTTPCodedError)): // the role is gone
	case err != nil:
		return nil, err
	case r.Shared:
		return sharedRole{b, s, cfg, name, r}, nil
	}
	_, err = b.endSharedToken(ctx, s, name, false)
	return nil, err
}
