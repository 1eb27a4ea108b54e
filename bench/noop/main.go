// Command noop is the benchmark's leased floor: an external secrets engine whose path creds returns
// a constant under a lease whose revocation does nothing. Every external plugin pays at least what a
// read of it costs. Its path token returns a constant shaped as the engine's user-token answer (the
// same fields and sizes, a lease of hours that is not renewable): what that answer costs Vault. Its
// path mint makes the engine's client-credentials POST to the stand-in set at mint-target and
// answers as the engine's token path does, with none of the engine's own work: what any plugin
// that mints a token pays.
package main

import (
	"context"
	"log"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

func main() {
	if err := plugin.ServeMultiplex(&plugin.ServeOpts{BackendFactoryFunc: factory}); err != nil {
		log.Fatal(err)
	}
}

func factory(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
	b := &framework.Backend{BackendType: logical.TypeLogical}
	b.Secrets = []*framework.Secret{{
		Type: "noop",
		Revoke: func(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
			return nil, nil
		},
	}}
	// Callbacks, as the engine's hot paths use: Operations would cost a replication-state call to Vault.
	read := func(answer func() *logical.Response) map[logical.Operation]framework.OperationFunc {
		return map[logical.Operation]framework.OperationFunc{
			logical.ReadOperation: func(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
				return answer(), nil
			},
		}
	}
	var target clientcredentials.Config // set once, before the reads of mint
	pool := http.DefaultTransport.(*http.Transport).Clone()
	pool.MaxIdleConnsPerHost = 64 // as the engine's client
	client := &http.Client{Transport: pool}
	b.Paths = []*framework.Path{
		{Pattern: "mint-target", Fields: map[string]*framework.FieldSchema{
			"token_url": {Type: framework.TypeString}, "client_id": {Type: framework.TypeString}, "client_secret": {Type: framework.TypeString},
		}, Callbacks: map[logical.Operation]framework.OperationFunc{
			logical.UpdateOperation: func(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
				target = clientcredentials.Config{
					TokenURL: d.Get("token_url").(string), ClientID: d.Get("client_id").(string),
					ClientSecret: d.Get("client_secret").(string), AuthStyle: oauth2.AuthStyleInHeader,
				}
				return nil, nil
			},
		}},
		{Pattern: "mint", Callbacks: map[logical.Operation]framework.OperationFunc{
			logical.ReadOperation: func(ctx context.Context, _ *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
				tok, err := target.Token(context.WithValue(ctx, oauth2.HTTPClient, client))
				if err != nil {
					return nil, err
				}
				expiresAt := tok.Expiry.Format(time.RFC3339)
				scope, _ := tok.Extra("scope").(string)
				resp := b.Secret("noop").Response(
					map[string]any{"access_token": tok.AccessToken, "token_type": tok.Type(), "scope": scope, "expires_at": expiresAt},
					map[string]any{"client_id": target.ClientID, "access_token": tok.AccessToken, "expires_at": expiresAt},
				)
				resp.Secret.MaxTTL = time.Until(tok.Expiry)
				return resp, nil
			},
		}},
		{Pattern: "creds", Callbacks: read(func() *logical.Response {
			return b.Secret("noop").Response(map[string]any{"value": "x"}, nil)
		})},
		{Pattern: "token", Callbacks: read(func() *logical.Response {
			resp := b.Secret("noop").Response(map[string]any{
				"access_token": "access-00000000000000000000001", // as long as ev.energy's
				"token_type":   "Bearer",
				"scope":        "charging_session:read vehicle:read",
				"expires_at":   time.Now().Add(10 * time.Hour).UTC().Format(time.RFC3339),
			}, nil)
			resp.Secret.TTL, resp.Secret.Renewable = 9*time.Hour, false
			return resp
		})},
	}
	if err := b.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return b, nil
}
