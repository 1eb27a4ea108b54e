package evenergy

import (
	"cmp"
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

func pathRevoke(b *backend) *framework.Path {
	return &framework.Path{
		Pattern: "revoke",
		Fields: map[string]*framework.FieldSchema{
			"token": {
				Type:         framework.TypeString,
				Description:  "The ev.energy access or refresh token to revoke.",
				Required:     true,
				DisplayAttrs: &framework.DisplayAttributes{Sensitive: true},
			},
			"token_type_hint": {
				Type:          framework.TypeString,
				Description:   "What the token is: access_token or refresh_token. Optional.",
				AllowedValues: []any{"access_token", "refresh_token"},
			},
		},
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationVerb: "revoke", OperationSuffix: "token"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{
				Callback: b.pathRevokeWrite,
				Summary:  "Revoke any ev.energy access or refresh token at ev.energy.",
			},
		},
		HelpSynopsis: "Revoke any ev.energy token at once, as every client the engine holds.",
		HelpDescription: `Revokes an access or refresh token at ev.energy (its /o/revoke_token/ endpoint) now, for an
incident or a token that leaked outside Vault. ev.energy answers every client alike but revokes a
token only for the client that holds it, so the request is sent as the configured client and then
as each retired client whose credentials the engine still keeps (no config is needed while retired
clients are kept). revoked_as lists the clients that sent it, clients says per client "sent" or why
ev.energy refused it, with a warning for each refusal; the write fails only when no client could
send it. A retired client that ev.energy refuses shows in revocations.`,
	}
}

func (b *backend) pathRevokeWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	token := d.Get("token").(string)
	if token == "" {
		return logical.ErrorResponse("token is required: the ev.energy access or refresh token to revoke"), nil
	}
	hint := d.Get("token_type_hint").(string)
	if hint != "" && hint != "access_token" && hint != "refresh_token" {
		return logical.ErrorResponse("token_type_hint must be access_token or refresh_token"), nil
	}
	retired, err := b.retiredClientIDs(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	clientIDs := retired
	cfg, _, configErr := b.config(ctx, req.Storage)
	if configErr == nil {
		clientIDs = append([]string{cfg.ClientID}, retired...)
	} else if len(retired) == 0 {
		return nil, configErr
	}
	// ev.energy answers 200 to every client, and revokes a token only for the client that holds it
	// (RFC 7009), so the configured client and then each retired one sends it.
	resp := &logical.Response{}
	sentAs, outcomes := []string{}, map[string]string{}
	var firstErr error
	for _, id := range clientIDs {
		client, err := b.clientFor(ctx, req.Storage, id)
		if err == nil {
			err = client.revoke(ctx, token, hint)
		}
		if err != nil {
			b.revocations.failed(id, err, time.Now())
			firstErr = cmp.Or(firstErr, err)
			outcomes[id] = err.Error()
			resp.AddWarning(fmt.Sprintf("not sent as client %s: %v", id, err))
			continue
		}
		b.revocations.succeeded(id)
		sentAs = append(sentAs, id)
		outcomes[id] = "sent"
	}
	if len(sentAs) == 0 {
		return nil, firstErr
	}
	resp.Data = map[string]any{"revoked_as": sentAs, "clients": outcomes}
	return resp, nil
}
