package evenergy

import (
	"cmp"
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// retryNowBudget bounds how long an operator's retry of the queue may call ev.energy.
const retryNowBudget = 30 * time.Second

func pathRevocations(b *backend) *framework.Path {
	return &framework.Path{
		Pattern: "revocations",
		Fields: map[string]*framework.FieldSchema{
			"include_deferred": {
				Type:        framework.TypeBool,
				Default:     false,
				Description: "Also revoke the records deferred until the leases handed out from them end (a user's replaced grant): those leases' tokens die early.",
			},
			"drop_client": {
				Type:        framework.TypeString,
				Description: `Drop, without revoking, every queued record of this client_id ("" for records whose client is unknown), whose revocation can never succeed; nothing is retried. Their tokens stay valid at ev.energy: a refresh token until revoked there.`,
			},
		},
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "revocations"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathRevocationsRead,
				Summary:  "Count the tokens queued for revocation at ev.energy, by client, with the last error.",
			},
			logical.UpdateOperation: &framework.PathOperation{
				Callback:     b.pathRevocationsWrite,
				Summary:      "Retry every queued revocation now, or drop one client's records.",
				DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "retry"},
			},
		},
		HelpSynopsis: "Tokens queued for revocation at ev.energy until ev.energy confirms.",
		HelpDescription: `When ev.energy does not confirm a revocation (a lease that ended, a token minted for a caller who
left, a user's replaced or deleted grant), the engine queues the token, sealed in storage with the
client that minted it, and the active node retries it every periodic pass, backing off per client
up to 60 seconds, until ev.energy confirms or the token has expired. Read shows the queue by client
(how many, since when, the last error; never a token), and clients refused by the revoke path.
Write retries everything now except records deferred until their leases end, which
include_deferred=true revokes too (ending those leases' tokens early). A write with drop_client
instead drops that client's records unrevoked, for a client whose credentials are gone: the answer
warns what they hold and until when.`,
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

func (b *backend) pathRevocationsWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	if err := b.ensureWritable(); err != nil {
		return nil, err
	}
	var warning string
	if clientID, drop := d.GetOk("drop_client"); drop {
		dropWarning, err := b.dropRevocations(ctx, req.Storage, clientID.(string))
		if err != nil {
			return nil, err
		}
		warning = cmp.Or(dropWarning, fmt.Sprintf("no queued revocation of client %q: nothing dropped", clientID))
	} else {
		early, err := b.retryRevocations(ctx, req.Storage, time.Now().Add(retryNowBudget), true, d.Get("include_deferred").(bool))
		if err != nil {
			return nil, err
		}
		if early > 0 {
			warning = fmt.Sprintf("revoked %d deferred records before their leases ended: readers holding those leases now hold dead tokens", early)
		}
	}
	resp, err := b.pathRevocationsRead(ctx, req, nil)
	if err == nil && warning != "" {
		resp.AddWarning(warning)
	}
	return resp, err
}
