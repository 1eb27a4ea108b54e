// Command noop is the benchmark's leased floor: an external secrets engine whose path creds returns
// a constant under a lease whose revocation does nothing. Every external plugin pays at least what a
// read of it costs. Its path token returns a constant shaped as the engine's user-token answer (the
// same fields and sizes, a lease of hours that is not renewable): what that answer costs Vault.
package main

import (
	"context"
	"log"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/hashicorp/vault/sdk/plugin"
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
	b.Paths = []*framework.Path{
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
