package evenergy

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// refreshWorkers bounds how many refreshes the background refresh sends to ev.energy at once.
const refreshWorkers = 16

// passBudget is how long a periodic pass goes on, all its steps together: starting revocations,
// waiting for the background refresh's first round, deleting expired pending authorizations. Vault
// holds its state lock through the pass, so a step-down or a seal waits for it: the calls already
// sent finish (within request_timeout), and the rest wait for the next pass.
const passBudget = 2 * time.Second

// periodic runs every minute on the active node only: it revokes unconfirmed grants nobody
// claimed in time, retries queued revocations, starts the background refresh of the
// held tokens due for a refresh, forgets expired pending authorizations and retired clients of
// which nothing is left. What is due is known from memory, so a pass with nothing to do reads no
// storage. The steps share one budget, the revocations first: they are a promise, the sweep is
// housekeeping that the next pass goes on with.
func (b *backend) periodic(ctx context.Context, req *logical.Request) error {
	if b.ensureWritable() != nil {
		return nil
	}
	s, end := req.Storage, time.Now().Add(passBudget)
	ctx = callsUntil(ctx, end)
	unclaimed := b.revokeUnclaimedGrants(ctx, s, end)
	_, revocations := b.retryRevocations(ctx, s, end, false, false)
	firstRound, refresh := b.refreshDueTokens(ctx, s, end)
	return errors.Join(unclaimed, revocations, refresh,
		b.sweepPending(ctx, s, end),
		b.forgetExpiredSelfMadeLinks(ctx, s, end),
		awaitFirstRound(ctx, firstRound, end),
		b.forgetSpentClients(ctx, s, time.Now()),
	)
}
