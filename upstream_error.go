package evenergy

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/oauth2"
)

// What the engine asks of ev.energy, as error messages name it.
const (
	opToken    = "token request"
	opExchange = "authorization code exchange"
	opRefresh  = "token refresh"
	opRevoke   = "token revocation"
)

// endpoints are the ev.energy endpoints of the calls, as metrics label them.
var endpoints = map[string]string{opToken: "token", opExchange: "token", opRefresh: "token", opRevoke: "revoke_token"}

// Why a call got no usable answer from ev.energy.
const (
	faultTimeout      = "timeout"
	faultRefused      = "connection refused"
	faultBroken       = "connection failed"
	faultGarbage      = "not an OAuth answer"
	faultNotConfirmed = "not a revocation confirmation" // a 200 with a body, where ev.energy confirms with an empty one
)

// upstreamError is a failed call to ev.energy. As a logical.HTTPCodedError it reaches the Vault
// client as 400 (ev.energy refused, with its OAuth error), 429 (ev.energy is rate limiting, with
// its Retry-After) or 502 (ev.energy failed, or gave no usable answer).
type upstreamError struct {
	Op          string
	Status      int // ev.energy's HTTP status; 0 when no answer came
	OAuthCode   string
	Description string
	RetryAfter  time.Duration // from a 429's Retry-After
	Location    string        // the host a 3xx answer redirects to, which the engine does not follow
	Fault       string        // set when no usable answer came
	Err         error         // the network error behind faultBroken
}

func (e *upstreamError) Error() string {
	oauth := e.OAuthCode
	if e.Description != "" {
		oauth += ": " + e.Description
	}
	switch {
	case e.Status == http.StatusTooManyRequests && e.RetryAfter > 0:
		return fmt.Sprintf("ev.energy is rate limiting the %s (HTTP 429): retry after %s", e.Op, e.RetryAfter)
	case e.Status == http.StatusTooManyRequests:
		return fmt.Sprintf("ev.energy is rate limiting the %s (HTTP 429): retry later", e.Op)
	case isRedirect(e.Status) && e.Location != "":
		return fmt.Sprintf("ev.energy answered the %s with a redirect (HTTP %d) to %s, which the engine does not follow: check base_url", e.Op, e.Status, e.Location)
	case isRedirect(e.Status):
		return fmt.Sprintf("ev.energy answered the %s with a redirect (HTTP %d) without a location, which the engine does not follow: check base_url", e.Op, e.Status)
	case e.Status >= 500 && e.OAuthCode != "":
		return fmt.Sprintf("ev.energy failed the %s with HTTP %d (%s)", e.Op, e.Status, oauth)
	case e.Status >= 500:
		return fmt.Sprintf("ev.energy failed the %s with HTTP %d", e.Op, e.Status)
	case e.OAuthCode != "":
		return fmt.Sprintf("ev.energy refused the %s: %s", e.Op, oauth)
	case e.Fault == faultNotConfirmed:
		return fmt.Sprintf("ev.energy answered the %s with HTTP 200 and a body, which is not its confirmation (an empty body): check base_url", e.Op)
	case e.Status != 0:
		return fmt.Sprintf("ev.energy answered the %s with HTTP %d and no OAuth error: check base_url", e.Op, e.Status)
	case e.Fault == faultTimeout:
		return fmt.Sprintf("ev.energy did not answer the %s within the config's request_timeout", e.Op)
	case e.Fault == faultRefused:
		return fmt.Sprintf("could not connect to ev.energy for the %s: connection refused (check base_url)", e.Op)
	case e.Fault == faultBroken:
		return fmt.Sprintf("the connection to ev.energy failed during the %s: %v", e.Op, e.Err)
	default:
		return fmt.Sprintf("ev.energy answered the %s with something that is not an OAuth response", e.Op)
	}
}

func (e *upstreamError) Code() int {
	switch {
	case e.Status == http.StatusTooManyRequests:
		return http.StatusTooManyRequests
	case e.OAuthCode != "" && e.Status < 500:
		return http.StatusBadRequest
	default:
		return http.StatusBadGateway
	}
}

// asUpstreamError classifies an error of a call to ev.energy; nil stays nil.
func asUpstreamError(op string, err error) error {
	var (
		upstream *upstreamError
		answer   *oauth2.RetrieveError
		netErr   net.Error
		urlErr   *url.Error
	)
	switch {
	case err == nil:
		return nil
	case errors.As(err, &upstream):
		return upstream
	case errors.As(err, &answer):
		return &upstreamError{Op: op, Status: answer.Response.StatusCode, OAuthCode: answer.ErrorCode,
			Description: answer.ErrorDescription, RetryAfter: retryAfter(answer.Response.Header), Location: redirectHost(answer.Response)}
	case errors.As(err, &netErr) && netErr.Timeout():
		return &upstreamError{Op: op, Fault: faultTimeout}
	case errors.Is(err, syscall.ECONNREFUSED):
		return &upstreamError{Op: op, Fault: faultRefused}
	case errors.As(err, &urlErr):
		return &upstreamError{Op: op, Fault: faultBroken, Err: urlErr.Err}
	default: // x/oauth2 could not read a token out of a 2xx answer
		return &upstreamError{Op: op, Fault: faultGarbage}
	}
}

// answerError is a non-200 answer of an endpoint that x/oauth2 does not call (revoke_token).
func answerError(op string, resp *http.Response, body []byte) error {
	e := &upstreamError{Op: op, Status: resp.StatusCode, RetryAfter: retryAfter(resp.Header), Location: redirectHost(resp)}
	var oauthBody struct {
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}
	if json.Unmarshal(body, &oauthBody) == nil {
		e.OAuthCode, e.Description = oauthBody.Error, oauthBody.ErrorDescription
	}
	return e
}

func isRedirect(status int) bool { return status >= 300 && status < 400 }

// redirectHost is the host a 3xx answer points to (only the host: its path or query may carry
// anything); "" for other answers or without a usable Location.
func redirectHost(resp *http.Response) string {
	if !isRedirect(resp.StatusCode) {
		return ""
	}
	location, err := resp.Location()
	if err != nil {
		return ""
	}
	return location.Host
}

// retryAfter reads Retry-After as seconds or an HTTP date (RFC 9110 section 10.2.3); 0 when absent.
func retryAfter(h http.Header) time.Duration {
	v := h.Get("Retry-After")
	if seconds, err := strconv.Atoi(v); err == nil && seconds >= 0 {
		return time.Duration(seconds) * time.Second
	}
	if at, err := http.ParseTime(v); err == nil {
		return max(time.Until(at).Round(time.Second), 0)
	}
	return 0
}
