package evenergy

import (
	"context"
	"errors"
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
// starts the background refresh of the held tokens due for a refresh and forgets retired clients
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
		b.refreshDueTokens(ctx, req.Storage),
		b.forgetSpentClients(ctx, req.Storage, time.Now()),
	)
}

// retryRevocationsInPass retries the queued records that are due, within the pass's budget.
func (b *backend) retryRevocationsInPass(ctx context.Context, s logical.Storage) error {
	_, err := b.retryRevocations(ctx, s, time.Now().Add(passBudget), false, false)
	return err
}

// forgetExpiredAuthorizations deletes pending authorizations nobody came back for in time, until
// passBudget or ctx ends; the next pass goes on from there.
func (b *backend) forgetExpiredAuthorizations(ctx context.Context, s logical.Storage) error {
	return b.sweepPending(ctx, s, time.Now().Add(passBudget))
}
