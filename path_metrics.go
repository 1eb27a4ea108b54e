package evenergy

import (
	"bytes"
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/prometheus/common/expfmt"
)

func pathMetrics(b *backend) *framework.Path {
	return &framework.Path{
		Pattern:      "metrics",
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "metrics"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathMetricsRead,
				Summary:  "Read this node's figures of the engine, in Prometheus text format.",
			},
		},
		HelpSynopsis: "This node's figures of the engine, in Prometheus text format.",
		HelpDescription: `Tokens minted and revoked, failed calls to ev.energy by OAuth error or HTTP status, user token
refreshes by outcome, grants by status and the latency of calls to ev.energy. The figures are this
node's and this mount's, counted since the plugin started: scrape every node.`,
	}
}

func (b *backend) pathMetricsRead(_ context.Context, _ *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	families, err := b.metrics.registry.Gather()
	if err != nil {
		return nil, err
	}
	format := expfmt.NewFormat(expfmt.TypeTextPlain)
	var body bytes.Buffer
	encoder := expfmt.NewEncoder(&body, format)
	for _, family := range families {
		if err := encoder.Encode(family); err != nil {
			return nil, err
		}
	}
	return &logical.Response{Data: map[string]any{
		logical.HTTPStatusCode:         200,
		logical.HTTPContentType:        string(format),
		logical.HTTPRawBody:            body.Bytes(),
		logical.HTTPCacheControlHeader: "no-store",
	}}, nil
}
