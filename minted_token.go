package evenergy

import (
	"context"
	"encoding/json"
	"errors"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"golang.org/x/oauth2"
)

// walKindMintedToken marks the write-ahead record of a client-credentials token between its mint
// and the answer that hands it to Vault as a lease.
const walKindMintedToken = "minted_token"

// mintedToken is what the write-ahead record keeps: enough to revoke the token.
type mintedToken struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token,omitempty"`
}

// leaseOrRevoke returns resp, which hands Vault a token just minted, only while its caller is still
// there: Vault registers no lease for an answer to a caller that went away, so then the token is
// revoked instead. A write-ahead record covers a crash of the plugin in between.
func (b *backend) leaseOrRevoke(ctx context.Context, s logical.Storage, client *evenergyClient, tok *oauth2.Token, resp *logical.Response) (*logical.Response, error) {
	minted := mintedToken{AccessToken: tok.AccessToken, RefreshToken: tok.RefreshToken}
	detached := context.WithoutCancel(ctx)
	walID, err := framework.PutWAL(detached, s, walKindMintedToken, minted)
	if err != nil {
		b.abandon(detached, s, client, minted, "")
		return nil, err
	}
	if err := framework.DeleteWAL(detached, s, walID); err != nil {
		b.abandon(detached, s, client, minted, walID)
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		b.abandon(detached, s, client, minted, "")
		return nil, err
	}
	return resp, nil
}

// abandon revokes a minted token that no lease will own. Until ev.energy confirms, a write-ahead
// record (walID, or a new one) stays for the rollback to try again.
func (b *backend) abandon(ctx context.Context, s logical.Storage, client *evenergyClient, minted mintedToken, walID string) {
	err := revokeMinted(ctx, client, minted)
	switch {
	case err == nil && walID != "":
		err = framework.DeleteWAL(ctx, s, walID)
	case err != nil && walID == "":
		_, walErr := framework.PutWAL(ctx, s, walKindMintedToken, minted)
		err = errors.Join(err, walErr)
	}
	if err != nil {
		b.Logger().Warn("a minted ev.energy token that no lease owns is not revoked yet", "error", err)
	}
}

// rollbackMintedToken revokes the token of a write-ahead record that outlived its request.
func (b *backend) rollbackMintedToken(ctx context.Context, req *logical.Request, kind string, data any) error {
	if kind != walKindMintedToken {
		return nil // not ours to undo; the record is dropped
	}
	// The WAL hands back its data JSON-decoded into generic maps.
	raw, err := json.Marshal(data)
	if err != nil {
		return err
	}
	var minted mintedToken
	if err := json.Unmarshal(raw, &minted); err != nil {
		return err
	}
	_, client, err := b.config(ctx, req.Storage)
	if err != nil {
		return err
	}
	return revokeMinted(ctx, client, minted)
}

// revokeMinted revokes both tokens of a grant; revoking the refresh token alone would also end the access token.
func revokeMinted(ctx context.Context, client *evenergyClient, minted mintedToken) error {
	if minted.RefreshToken != "" {
		if err := client.revoke(ctx, minted.RefreshToken, "refresh_token"); err != nil {
			return err
		}
	}
	return client.revoke(ctx, minted.AccessToken, "access_token")
}
