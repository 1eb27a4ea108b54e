package evenergy

import (
	"context"

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
		HelpSynopsis:    "Revoke any ev.energy token with the configured client.",
		HelpDescription: "Revokes an access or refresh token at ev.energy (its /o/revoke_token/ endpoint). Use it for a token that leaked outside Vault; tokens under a Vault lease are revoked when their lease ends.",
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
	_, client, err := b.config(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return nil, client.revoke(ctx, token, hint)
}
