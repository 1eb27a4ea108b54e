package evenergy

import (
	"bytes"
	"context"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Formats of the metrics path, as Vault's own sys/metrics names them: JSON unless asked otherwise.
const (
	metricsJSON       = "json"
	metricsPrometheus = "prometheus"
)

func pathMetrics(b *backend) *framework.Path {
	return &framework.Path{
		Pattern: "metrics",
		Fields: map[string]*framework.FieldSchema{
			"format": {
				Type:          framework.TypeString,
				Description:   "json: each series by name with its labels and value; prometheus: Prometheus text exposition format.",
				Default:       metricsJSON,
				AllowedValues: []any{metricsJSON, metricsPrometheus},
				Query:         true,
			},
		},
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "metrics"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathMetricsRead,
				Summary:  "Read this node's figures of the engine, as JSON or in Prometheus text format.",
			},
		},
		HelpSynopsis: "This node's figures of the engine, as JSON or (format=prometheus) in Prometheus text format.",
		HelpDescription: `Tokens minted and revoked, failed calls to ev.energy by OAuth error or HTTP status, user token
refreshes by outcome, grants by status and the latency of calls to ev.energy. The figures are this
node's and this mount's, counted since the plugin started: scrape every node, with format=prometheus.`,
	}
}

func (b *backend) pathMetricsRead(_ context.Context, _ *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	format := d.Get("format").(string)
	if format != metricsJSON && format != metricsPrometheus {
		return logical.ErrorResponse("format must be json or prometheus"), logical.ErrInvalidRequest
	}
	families, err := b.metrics.registry.Gather()
	if err != nil {
		return nil, err
	}
	if format == metricsPrometheus {
		return prometheusText(families)
	}
	series, err := seriesByName(families)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: series}, nil
}

// seriesByName lists each series under its name with its labels and value, the series Prometheus
// text holds: a histogram is its _bucket, _sum and _count series.
func seriesByName(families []*dto.MetricFamily) (map[string]any, error) {
	samples, err := expfmt.ExtractSamples(&expfmt.DecodeOptions{Timestamp: model.Now()}, families...)
	if err != nil {
		return nil, err
	}
	data := map[string]any{}
	for _, sample := range samples {
		name := string(sample.Metric[model.MetricNameLabel])
		labels := map[string]string{}
		for label, value := range sample.Metric {
			if label != model.MetricNameLabel {
				labels[string(label)] = string(value)
			}
		}
		series, _ := data[name].([]map[string]any)
		data[name] = append(series, map[string]any{"labels": labels, "value": float64(sample.Value)})
	}
	return data, nil
}

// prometheusText is the raw answer Prometheus scrapes.
func prometheusText(families []*dto.MetricFamily) (*logical.Response, error) {
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
