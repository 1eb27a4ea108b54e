// Command noop is the benchmark's leased floor: an external secrets engine whose one path, creds,
// returns a constant under a lease whose revocation does nothing. Every external plugin pays at
// least what a read of it costs.
package main

import (
	"context"
	"log"

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
	b.Paths = []*framework.Path{{
		Pattern: "creds",
		// Callbacks, as the engine's hot paths use: Operations would cost a replication-state call to Vault.
		Callbacks: map[logical.Operation]framework.OperationFunc{
			logical.ReadOperation: func(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
				return b.Secret("noop").Response(map[string]any{"value": "x"}, nil), nil
			},
		},
	}}
	if err := b.Setup(ctx, conf); err != nil {
		return nil, err
	}
	return b, nil
}
