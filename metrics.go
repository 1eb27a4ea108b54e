package evenergy

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are one mount's figures on this node, in a registry of its own: the plugin process
// cannot reach Vault's telemetry. No label ever holds a token, a secret, a code or a user name.
type metrics struct {
	registry     *prometheus.Registry
	minted       *prometheus.CounterVec
	revoked      *prometheus.CounterVec
	failures     *prometheus.CounterVec
	refreshes    *prometheus.CounterVec
	sharedTokens *prometheus.CounterVec
	latency      *prometheus.HistogramVec
}

// What happened to shared roles' tokens.
const (
	sharedMinted   = "minted"
	sharedReplaced = "replaced" // a stored one set aside, revoked once its leases end: at its refresh point, or as what it was minted with changed
)

// Outcomes of a user token refresh.
const (
	refreshOK      = "ok"
	refreshFailed  = "failed"  // a passing failure: the grant is kept and tried again
	refreshRevoked = "revoked" // ev.energy no longer accepts the grant
	refreshLost    = "lost"    // the answer was lost after ev.energy rotated the grant, which ended it
)

func newMetrics(grantsByStatus func() map[string]int, pendingRevocations func() int, waitingForBudget func() map[string]int) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		minted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "evenergy_tokens_minted_total",
			Help: "Access tokens ev.energy issued to this engine, by grant type.",
		}, []string{"grant_type"}),
		revoked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "evenergy_tokens_revoked_total",
			Help: "Tokens this engine revoked at ev.energy, by token type.",
		}, []string{"token_type"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "evenergy_upstream_failures_total",
			Help: "Failed calls to ev.energy, by endpoint and by ev.energy's OAuth error, HTTP status or what went wrong.",
		}, []string{"endpoint", "error"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "evenergy_user_token_refreshes_total",
			Help: "Refreshes of users' tokens, by outcome: ok, failed (kept, tried again), revoked, or lost (the answer was lost after ev.energy rotated the grant, which ended it).",
		}, []string{"outcome"}),
		sharedTokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "evenergy_shared_tokens_total",
			Help: "Shared roles' tokens this engine minted, by event: minted (every one), replaced (a stored one set aside, revoked once its leases end).",
		}, []string{"event"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "evenergy_upstream_request_duration_seconds",
			Help:    "Duration of HTTP requests to ev.energy, by endpoint.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"endpoint"}),
	}
	grants := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "evenergy_user_grants",
		Help: "Users' grants this node knows, by status.",
	}, []string{"status"})
	pending := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "evenergy_revocations_pending",
		Help: "Tokens queued for revocation at ev.energy that ev.energy has not confirmed yet.",
	}, func() float64 { return float64(pendingRevocations()) })
	waiting := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "evenergy_calls_waiting_for_budget",
		Help: "Calls to ev.energy waiting for their turn under the config's call_budget, by call: refresh or revocation.",
	}, []string{"call"})
	m.registry.MustRegister(m.minted, m.revoked, m.failures, m.refreshes, m.sharedTokens, m.latency,
		gaugeFunc{grants, grantsByStatus}, pending, gaugeFunc{waiting, waitingForBudget})
	return m
}

// gaugeFunc sets a gauge vector from memory when scraped.
type gaugeFunc struct {
	*prometheus.GaugeVec
	values func() map[string]int
}

func (g gaugeFunc) Collect(ch chan<- prometheus.Metric) {
	g.Reset()
	for label, n := range g.values() {
		g.WithLabelValues(label).Set(float64(n))
	}
	g.GaugeVec.Collect(ch)
}

// endpointOf names the ev.energy endpoint a URL path is, for labels.
func endpointOf(path string) string {
	switch {
	case strings.HasPrefix(path, "/o/token"):
		return "token"
	case strings.HasPrefix(path, "/o/revoke_token"):
		return "revoke_token"
	default:
		return "other"
	}
}

// failureLabel is what went wrong, from a fixed set: RFC 6749's error codes, HTTP statuses and faults.
func failureLabel(err error) string {
	var upstream *upstreamError
	switch {
	case !errors.As(err, &upstream):
		return "internal"
	case upstream.OAuthCode != "" && oauthErrors[upstream.OAuthCode]:
		return upstream.OAuthCode
	case upstream.OAuthCode != "":
		return "other_oauth_error"
	case upstream.Status != 0:
		return "http_" + strconv.Itoa(upstream.Status)
	default:
		return strings.ReplaceAll(upstream.Fault, " ", "_")
	}
}

// oauthErrors are the token and revocation endpoints' error codes (RFC 6749 5.2, RFC 7009 2.2.1).
var oauthErrors = map[string]bool{
	"invalid_request": true, "invalid_client": true, "invalid_grant": true, "unauthorized_client": true,
	"unsupported_grant_type": true, "invalid_scope": true, "unsupported_token_type": true,
	"server_error": true, "temporarily_unavailable": true, "access_denied": true,
}

// timedTransport observes the duration of every HTTP request to ev.energy.
type timedTransport struct {
	next    http.RoundTripper
	latency *prometheus.HistogramVec
}

func (t timedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(req)
	t.latency.WithLabelValues(endpointOf(req.URL.Path)).Observe(time.Since(start).Seconds())
	return resp, err
}
