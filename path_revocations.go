package evenergy

import (
	"context"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// retryNowBudget bounds how long an operator's retry of the queue may call ev.energy.
const retryNowBudget = 30 * time.Second

func pathRevocations(b *backend) *framework.Path {
	return &framework.Path{
		Pattern:      "revocations",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "revocations"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathRevocationsRead,
				Summary:  "Count the tokens queued for revocation at ev.energy, by client, with the last error.",
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathRevocationsWrite,
				Summary:      "Retry every queued revocation now.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "retry"},
			},
		},
		HelpSynopsis: "Tokens queued for revocation at ev.energy until ev.energy confirms.",
		HelpDescription: `When ev.energy does not confirm a revocation (a lease that ended, a token minted for a caller who
left, a user's replaced or deleted grant), the engine queues the token, sealed in storage with the
client that minted it, and the active node retries it every periodic pass, backing off per client
up to 60 seconds, until ev.energy confirms or the token has expired. Read shows the queue by client
(how many, since when, the last error; never a token). Write retries everything now.`,
	}
}

// The queue's retry state lives in the active node's memory, so both operations run there.
func (b *backend) pathRevocationsRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	data, err := b.revocationSummary(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: data}, nil
}

func (b *backend) pathRevocationsWrite(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	if err := b.retryRevocations(ctx, req.Storage, time.Now().Add(retryNowBudget), true); err != nil {
		return nil, err
	}
	return b.pathRevocationsRead(ctx, req, nil)
}
