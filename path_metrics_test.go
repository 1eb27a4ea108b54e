package evenergy

import (
	"encoding/json"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

// TestAccMetricsCountAKnownSequence runs a known sequence of reads, failures and refreshes on a
// mount of the real Vault, then reads its metrics path: every counter must read back exactly.
func TestAccMetricsCountAKnownSequence(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.vault.SetMaxRetries(0) // the API client would retry a 502, and so count twice
	first := e.read(t, "token")
	e.read(t, "token")
	if err := e.vault.Sys().Revoke(first.LeaseID); err != nil {
		t.Fatal(err)
	}
	e.standin.SetFault(standin.Fault{Kind: standin.FaultServerError, Count: 1})
	e.wantReadError(t, "token", http.StatusBadGateway, "HTTP 500")
	e.write(t, "config", map[string]any{"client_secret": "wrong"})
	e.wantReadError(t, "token", http.StatusBadRequest, "invalid_client")
	e.write(t, "config", map[string]any{"client_secret": testClientSecret})

	e.connectDue(t, "driver-m")                          // a code exchange whose token is due
	e.standinToken(t, e.read(t, "users/driver-m/token")) // one refresh, ok
	e.connectDue(t, "driver-r")
	e.write(t, "revoke", map[string]any{"token": e.userTokens("driver-r", "refresh")[0].Value})
	e.wantReadError(t, "users/driver-r/token", http.StatusBadRequest, "send the user through auth-url again") // one refresh, revoked

	got := e.metrics(t)
	want := map[string]float64{
		`evenergy_tokens_minted_total{grant_type="client_credentials"}`:             2,
		`evenergy_tokens_minted_total{grant_type="authorization_code"}`:             2,
		`evenergy_tokens_minted_total{grant_type="refresh_token"}`:                  1,
		`evenergy_tokens_revoked_total{token_type="access_token"}`:                  1,
		`evenergy_tokens_revoked_total{token_type="unknown"}`:                       1,
		`evenergy_upstream_failures_total{endpoint="token",error="http_500"}`:       1,
		`evenergy_upstream_failures_total{endpoint="token",error="invalid_client"}`: 1,
		`evenergy_upstream_failures_total{endpoint="token",error="invalid_grant"}`:  1,
		`evenergy_user_token_refreshes_total{outcome="ok"}`:                         1,
		`evenergy_user_token_refreshes_total{outcome="revoked"}`:                    1,
		`evenergy_user_grants{status="active"}`:                                     1,
		`evenergy_user_grants{status="revoked"}`:                                    1,
		`evenergy_user_grants{status="other_client"}`:                               0,
		`evenergy_upstream_request_duration_seconds_count{endpoint="token"}`:        8,
		`evenergy_upstream_request_duration_seconds_count{endpoint="revoke_token"}`: 2,
		`evenergy_revocations_pending{}`:                                            0,
		`evenergy_calls_waiting_for_budget{call="refresh"}`:                         0,
		`evenergy_calls_waiting_for_budget{call="revocation"}`:                      0,
	}
	for series, value := range want {
		if got[series] != value {
			t.Errorf("%s = %v, want %v", series, got[series], value)
		}
	}
	for series := range got {
		if _, ok := want[series]; !ok && !strings.Contains(series, "_bucket") && !strings.Contains(series, "_sum") {
			t.Errorf("unexpected series %s = %v", series, got[series])
		}
	}
	if t.Failed() {
		t.Logf("all series:\n%s", strings.Join(sortedKeys(got), "\n"))
	}
}

// metrics reads this mount's metrics path through Vault in both formats, which must hold the same
// series, and returns every series by name and labels.
func (e *accEnv) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	text, asJSON := e.metricsText(t), e.metricsJSON(t)
	for series, value := range text {
		if got, ok := asJSON[series]; !ok || got != value {
			t.Errorf("%s is %v in Prometheus text but %v (present: %v) in JSON", series, value, got, ok)
		}
	}
	for series := range asJSON {
		if _, ok := text[series]; !ok {
			t.Errorf("%s is in JSON but not in Prometheus text", series)
		}
	}
	return text
}

// metricsText reads the metrics path with format=prometheus, as Prometheus scrapes it.
func (e *accEnv) metricsText(t *testing.T) map[string]float64 {
	t.Helper()
	resp, body := e.rawRead(t, "metrics?format=prometheus")
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("metrics answered %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("metrics are not Prometheus text: %v", err)
	}
	list := make([]*dto.MetricFamily, 0, len(families))
	for _, family := range families {
		list = append(list, family)
	}
	samples, err := expfmt.ExtractSamples(&expfmt.DecodeOptions{Timestamp: model.Now()}, list...)
	if err != nil {
		t.Fatal(err)
	}
	series := map[string]float64{}
	for _, sample := range samples {
		labels := map[string]string{}
		for name, value := range sample.Metric {
			labels[string(name)] = string(value)
		}
		name := labels[model.MetricNameLabel]
		delete(labels, model.MetricNameLabel)
		series[seriesKey(name, labels)] = float64(sample.Value)
	}
	return series
}

// metricsJSON reads the metrics path as the Vault CLI does, without a format.
func (e *accEnv) metricsJSON(t *testing.T) map[string]float64 {
	t.Helper()
	secret := e.read(t, "metrics")
	series := map[string]float64{}
	for name, list := range secret.Data {
		entries, ok := list.([]any)
		if !ok {
			t.Fatalf("metrics JSON: %s is %T, not a list of series", name, list)
		}
		for _, entry := range entries {
			entry, _ := entry.(map[string]any)
			rawLabels, _ := entry["labels"].(map[string]any)
			labels := map[string]string{}
			for label, value := range rawLabels {
				labels[label], _ = value.(string)
			}
			number, ok := entry["value"].(json.Number)
			if !ok {
				t.Fatalf("metrics JSON: %s %v has no numeric value: %v", name, labels, entry)
			}
			value, err := number.Float64()
			if err != nil {
				t.Fatal(err)
			}
			series[seriesKey(name, labels)] = value
		}
	}
	return series
}

// seriesKey names a series as Prometheus text does, labels sorted: name{a="1",b="2"}.
func seriesKey(name string, labels map[string]string) string {
	pairs := make([]string, 0, len(labels))
	for label, value := range labels {
		pairs = append(pairs, label+`="`+value+`"`)
	}
	sort.Strings(pairs)
	return name + "{" + strings.Join(pairs, ",") + "}"
}

func sortedKeys(m map[string]float64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// TestAccMetricsReadInTheCLI checks that `vault read <mount>/metrics`, the first thing an operator
// types, prints the figures, and that an unknown format is a caller's mistake.
func TestAccMetricsReadInTheCLI(t *testing.T) {
	t.Parallel()
	e := newAccEnv(t)
	e.read(t, "token")
	stdout, stderr, err := e.cli(t, "read", e.path("metrics"))
	if err != nil || !regexp.MustCompile(`(?m)^evenergy_tokens_minted_total +\[map\[labels:map\[grant_type:client_credentials\] value:1\]\]$`).MatchString(stdout) {
		t.Fatalf("vault read metrics: %v\n%s%s", err, stdout, stderr)
	}
	_, err = e.vault.Logical().ReadWithData(e.path("metrics"), map[string][]string{"format": {"xml"}})
	wantStatus(t, err, http.StatusBadRequest, "format must be json or prometheus")
}
