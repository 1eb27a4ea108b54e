package evenergy

import (
	"context"
	"encoding/json"

	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

// leaseOrRevoke returns resp, which hands Vault a token just minted, only while its caller is still
// there: Vault registers no lease for an answer to a caller that went away, so then the token is
// revoked (or queued for revocation) instead. A healthy read writes nothing to storage.
func (b *backend) leaseOrRevoke(ctx context.Context, s logical.Storage, clientID string, tok *oauth2.Token, resp *logical.Response) (*logical.Response, error) {
	if err := ctx.Err(); err != nil {
		unowned := revocation{ClientID: clientID, AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken, ExpiresAt: tok.Expiry, Reason: reasonUnowned}
		if qerr := b.revokeOrQueue(context.WithoutCancel(ctx), s, unowned); qerr != nil {
			b.Logger().Error("a minted ev.energy token that no lease owns could not be revoked nor queued", "error", qerr)
		}
		return nil, err
	}
	return resp, nil
}

// walKindMintedToken marks the write-ahead records that versions before v0.3 wrote around each
// mint; the rollback hands any that are left to the revocation queue.
const walKindMintedToken = "minted_token"

func (b *backend) rollbackMintedToken(ctx context.Context, req *logical.Request, kind string, data any) error {
	if kind != walKindMintedToken {
		return nil // not ours to undo; the record is dropped
	}
	// The WAL hands back its data JSON-decoded into generic maps.
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	rec := revocation{Reason: reasonUnowned}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return err
	}
	return b.revokeOrQueue(ctx, req.Storage, rec)
}
