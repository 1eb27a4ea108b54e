package evenergy

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"unicode/utf8"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

func pathCallback(b *backend) *framework.Path {
	return &framework.Path{
		Pattern: "callback",
		Fields: map[string]*framework.FieldSchema{
			"state":             {Type: framework.TypeString, Description: "State from auth-url."},
			"code":              {Type: framework.TypeString, Description: "Authorization code from ev.energy."},
			"error":             {Type: framework.TypeString, Description: "OAuth error from ev.energy, e.g. access_denied."},
			"error_description": {Type: framework.TypeString, Description: "ev.energy's description of the error."},
		},
		DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationVerb: "complete", OperationSuffix: "authorization"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathCallbackRead,
				Summary:  "Where ev.energy sends a user's browser back; exchanges the code and answers a page.",
			},
		},
		HelpSynopsis: "Where ev.energy sends a user back after authorizing (unauthenticated).",
		HelpDescription: `Give https://VAULT/v1/<mount>/callback as redirect_uri to auth-url: the user's browser then comes
back straight to Vault, which exchanges the code (valid for 60 seconds) at once and answers with a
page that says whether the user is connected. A link a Vault entity made for itself is held instead:
the page shows a confirmation code, which that entity writes back to users/<user> with state.`,
	}
}

// callbackOutcome is what the user's visit to the callback came to, for the page to explain.
type callbackOutcome string

const (
	connected      callbackOutcome = "connected"
	toConfirm      callbackOutcome = "confirm"         // held until the link's maker writes back the confirmation code
	badLink        callbackOutcome = "bad-link"        // the state is unknown, expired, already used or malformed
	accessDenied   callbackOutcome = "access-denied"   // the user chose not to allow access at ev.energy
	refusedAtLogin callbackOutcome = "refused"         // ev.energy sent the user back with another OAuth error
	exchangeFailed callbackOutcome = "exchange-failed" // the code was not exchanged; the page's last branch
)

// callbackPageData is what the callback page needs to tell the user, in plain words, what happened.
type callbackPageData struct {
	Outcome     callbackOutcome
	App         string // the application the user connects to ev.energy
	LinkMinutes int    // how long a link from auth-url works
	Details     string // one short technical line: never a code, a state or a secret
	// ConfirmationCode is shown with the outcome "confirm" only: to whoever opened the link, who
	// is its maker unless the maker sent it to someone else.
	ConfirmationCode string
	VaultUser        string // with "confirm": who the account would be connected to, by names a person knows
}

// authorizationErrors are the errors RFC 6749 4.1.2.1 lets ev.energy send back, in the page's own
// words: the page shows no other text from its URL, which anyone can write.
var authorizationErrors = map[string]string{
	"invalid_request":           "ev.energy found the link incomplete or malformed (invalid_request)",
	"unauthorized_client":       "ev.energy does not let this application ask for access this way (unauthorized_client)",
	"access_denied":             "access was not allowed at ev.energy (access_denied)",
	"unsupported_response_type": "ev.energy does not support this kind of link (unsupported_response_type)",
	"invalid_scope":             "the link asked for access ev.energy does not grant this application (invalid_scope)",
	"server_error":              "ev.energy had an internal error (server_error)",
	"temporarily_unavailable":   "ev.energy is busy or down for maintenance (temporarily_unavailable)",
}

// authorizationErrorDetails is the Details line for an OAuth error sent back to the callback.
func authorizationErrorDetails(oauthErr string) string {
	if words, ok := authorizationErrors[oauthErr]; ok {
		return words
	}
	return "ev.energy sent back an error this page does not know"
}

// vaultUserName names the Vault entity entityID as a person knows it: the names of its aliases
// with their kind of login, after the entity's own name unless Vault generated it.
func (b *backend) vaultUserName(entityID string) string {
	entity, err := b.System().EntityInfo(entityID)
	if err != nil || entity == nil {
		return "the Vault entity " + entityID
	}
	var names []string
	if entity.Name != "" && !strings.HasPrefix(entity.Name, "entity_") {
		names = append(names, entity.Name)
	}
	for _, alias := range entity.Aliases {
		names = append(names, fmt.Sprintf("%s (%s login)", alias.Name, alias.MountType))
	}
	if len(names) == 0 {
		return "the Vault entity " + entityID
	}
	return "the Vault user " + strings.Join(names, ", ")
}

// callbackPage is the one screen a driver sees: self-contained (no scripts, nothing fetched, not
// even a favicon) and readable from a phone's width up. #result is "Connected", "Not connected
// yet" (a confirmation code to enter) or "Not connected", for scripts and tests. The
// application's name is an inline block, with the full stop after it, so that a hyphen in it does
// not break the name across lines.
var callbackPage = template.Must(template.New("callback").Parse(`{{$connected := eq .Outcome "connected" -}}
{{$confirm := eq .Outcome "confirm" -}}
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>ev.energy: {{if $connected}}Connected{{else if $confirm}}Not connected yet{{else}}Not connected{{end}}</title>
<style>
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;padding:1.5rem;background:#eef2f0;color:#1b2420;font:1.125rem/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{width:100%;max-width:34rem;background:#fff;border-radius:1rem;padding:2.25rem 2rem;box-shadow:0 1px 2px rgba(16,40,30,.06),0 10px 30px rgba(16,40,30,.08);overflow-wrap:anywhere}
.brand{margin:0 0 1.75rem;font-size:1rem;font-weight:700;letter-spacing:.02em;color:#0a6b47}
.icon{display:flex;align-items:center;justify-content:center;width:3.5rem;height:3.5rem;margin-bottom:1.25rem;border-radius:50%}
.ok .icon{background:#dff3e8;color:#0a7a4c}
.fail .icon{background:#fdebe7;color:#b42318}
.confirm .icon{background:#fff4d6;color:#8a5a00}
h1{margin:0 0 .75rem;font-size:1.875rem;line-height:1.2}
p{margin:0 0 1rem}
.app{display:inline-block}
.next{font-weight:600}
.code{margin:0 0 1rem;padding:.75rem 1rem;border-radius:.5rem;background:#f3f6f4;text-align:center;font:700 1.75rem/1.2 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;letter-spacing:.12em}
.details{margin:1.75rem 0 0;padding-top:1rem;border-top:1px solid #e3e8e5;font-size:.875rem;line-height:1.45;color:#5a6661}
@media (max-width:30rem){body{align-items:flex-start;padding:1rem}main{padding:1.75rem 1.5rem}}
</style>
</head>
<body>
<main class="{{if $connected}}ok{{else if $confirm}}confirm{{else}}fail{{end}}">
<p class="brand">ev.energy</p>
<div class="icon" aria-hidden="true"><svg width="30" height="30" viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2.5" stroke-linecap="round" stroke-linejoin="round">
{{- if $connected}}<path d="M5 12.5l4.5 4.5L19 7.5"/>{{else if $confirm}}<rect x="5" y="11" width="14" height="9" rx="2"/><path d="M8 11V8a4 4 0 0 1 8 0v3"/>{{else}}<path d="M7 7l10 10M17 7L7 17"/>{{end -}}
</svg></div>
<h1 id="result">{{if $connected}}Connected{{else if $confirm}}Not connected yet{{else}}Not connected{{end}}</h1>
{{- if $connected}}
<p id="happened">Your ev.energy account is now connected to <span class="app">{{.App}}.</span></p>
<p id="next" class="next">You can close this page and return to <span class="app">{{.App}}.</span></p>
{{- else if $confirm}}
<p id="who" class="next">This connects your ev.energy account to {{.VaultUser}}. If that is not you, close this page.</p>
<p id="happened">ev.energy allowed <span class="app">{{.App}}</span> to access your account. To finish connecting it, enter this code in <span class="app">{{.App}}</span> yourself, within {{.LinkMinutes}} minutes:</p>
<p id="confirmation-code" class="code">{{.ConfirmationCode}}</p>
<p id="next" class="next">Never give this code to anyone, not even to someone who sent you the link: whoever enters it gets access to your ev.energy account. Without the code, nothing is connected.</p>
{{- else if eq .Outcome "bad-link"}}
<p id="happened">This link has expired, has already been used or is not complete, so your ev.energy account was not connected. Each link works once, within {{.LinkMinutes}} minutes.</p>
<p id="next" class="next">Ask <span class="app">{{.App}}</span> for a new link and try again.</p>
{{- else if eq .Outcome "access-denied"}}
<p id="happened">You chose not to allow <span class="app">{{.App}}</span> to access your ev.energy account, so nothing was connected.</p>
<p id="next" class="next">If you meant to allow it, ask <span class="app">{{.App}}</span> for a new link and try again. Otherwise you can close this page.</p>
{{- else if eq .Outcome "refused"}}
<p id="happened">ev.energy did not let <span class="app">{{.App}}</span> connect to your account.</p>
<p id="next" class="next">Ask <span class="app">{{.App}}</span> for a new link and try again.</p>
{{- else}}
<p id="happened">Something went wrong while finishing the connection with ev.energy, so your account was not connected.</p>
<p id="next" class="next">Wait a few minutes, then ask <span class="app">{{.App}}</span> for a new link and try again.</p>
{{- end}}
<p id="details" class="details">Details: {{.Details}}</p>
</main>
</body>
</html>
`))

func (b *backend) pathCallbackRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	outcome := badLink
	state := trimmedField(d, "state")
	pending, err := b.consumeAuthRequest(ctx, req.Storage, "", state)
	var confirmation string // the code to show when the link waits for its maker
	var details string      // the page's Details line, when not the error's
	if err == nil {
		switch oauthErr := d.Get("error").(string); {
		case oauthErr != "":
			outcome = refusedAtLogin
			if oauthErr == "access_denied" {
				outcome = accessDenied
			}
			// Anyone can write this URL: its text goes to the log, the page says only what it knows.
			b.Logger().Info("ev.energy sent a user back to the callback with an error", "error", truncated(oauthErr), "error_description", truncated(d.Get("error_description").(string)))
			details = authorizationErrorDetails(oauthErr)
			err = logical.CodedError(http.StatusBadRequest, details)
		case pending.selfMade():
			// Whoever opened the link may not be its maker: only the maker may keep what it gives.
			if err = b.checkSelfMade(ctx, req, pending); err == nil {
				outcome = exchangeFailed
				confirmation, err = b.holdForConfirmation(ctx, req.Storage, state, pending, trimmedField(d, "code"))
			}
		default:
			outcome = exchangeFailed
			err = b.completeAuthorization(ctx, req.Storage, pending, trimmedField(d, "code"))
		}
	}
	var coded logical.HTTPCodedError
	switch {
	case err == nil && confirmation != "":
		data := b.callbackPageData(ctx, req.Storage, toConfirm, "held until the code is entered")
		data.ConfirmationCode, data.VaultUser = confirmation, b.vaultUserName(pending.MadeBy)
		return callbackResponse(http.StatusOK, data)
	case err == nil:
		return callbackResponse(http.StatusOK, b.callbackPageData(ctx, req.Storage, connected, "connected as "+pending.User))
	case errors.Is(err, logical.ErrReadOnly):
		return nil, err // Vault forwards the request to the active node
	case errors.As(err, &coded):
		return callbackResponse(coded.Code(), b.callbackPageData(ctx, req.Storage, outcome, cmp.Or(details, err.Error())))
	default:
		return nil, err
	}
}

// callbackPageData names the application by the config's display_name, or else its client_id.
func (b *backend) callbackPageData(ctx context.Context, s logical.Storage, outcome callbackOutcome, details string) callbackPageData {
	data := callbackPageData{Outcome: outcome, App: "the application", LinkMinutes: int(authRequestTTL.Minutes()), Details: details}
	if cfg, _, err := b.config(ctx, s); err == nil { // without a config the page still answers, naming no application
		data.App = cmp.Or(cfg.DisplayName, cfg.ClientID)
	}
	return data
}

// truncated is text from a URL cut to a length fit for one log line.
func truncated(text string) string {
	if len(text) <= 200 {
		return text
	}
	cut := 200
	for cut > 0 && !utf8.RuneStart(text[cut]) { // on a character boundary: the log line stays valid UTF-8
		cut--
	}
	return strings.ToValidUTF8(text[:cut], "") + "…"
}

func callbackResponse(status int, data callbackPageData) (*logical.Response, error) {
	var page bytes.Buffer
	if err := callbackPage.Execute(&page, data); err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		logical.HTTPStatusCode:         status,
		logical.HTTPContentType:        "text/html; charset=utf-8",
		logical.HTTPRawBody:            page.Bytes(),
		logical.HTTPCacheControlHeader: "no-store",
	}}, nil
}
