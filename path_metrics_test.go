package evenergy

import (
	"net/http"
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

// metrics reads this mount's metrics path through Vault and returns every series by name and labels.
func (e *accEnv) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	resp, body := e.rawRead(t, "metrics")
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
		t.Fatalf("metrics answered %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("metrics are not Prometheus text: %v", err)
	}
	series := map[string]float64{}
	for name, family := range families {
		for _, m := range family.Metric {
			labels := make([]string, 0, len(m.Label))
			for _, l := range m.Label {
				labels = append(labels, l.GetName()+`="`+l.GetValue()+`"`)
			}
			key := name + "{" + strings.Join(labels, ",") + "}"
			switch family.GetType() {
			case dto.MetricType_COUNTER:
				series[key] = m.Counter.GetValue()
			case dto.MetricType_GAUGE:
				series[key] = m.Gauge.GetValue()
			case dto.MetricType_HISTOGRAM:
				series[name+"_count{"+strings.Join(labels, ",")+"}"] = float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return series
}

func sortedKeys(m map[string]float64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
