package evenergy

import (
	"bytes"
	"context"
	"errors"
	"html/template"
	"net/http"

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
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathCallbackRead},
		},
		HelpSynopsis: "Where ev.energy sends a user back after authorizing (unauthenticated).",
		HelpDescription: `Give https://VAULT/v1/<mount>/callback as redirect_uri to auth-url: the user's browser then comes
back straight to Vault, which exchanges the code (valid for 60 seconds) at once and answers with a
page that says whether the user is connected.`,
	}
}

var callbackPage = template.Must(template.New("callback").Parse(`<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ev.energy: {{.Title}}</title></head>
<body><h1 id="result">{{.Title}}</h1><p>{{.Message}}</p></body></html>
`))

func (b *backend) pathCallbackRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	pending, err := b.consumeAuthRequest(ctx, req.Storage, "", d.Get("state").(string))
	if err == nil {
		if oauthErr := d.Get("error").(string); oauthErr != "" {
			err = &upstreamError{Op: "authorization", Status: http.StatusBadRequest, OAuthCode: oauthErr, Description: d.Get("error_description").(string)}
		} else {
			err = b.completeAuthorization(ctx, req.Storage, pending, d.Get("code").(string))
		}
	}
	var coded logical.HTTPCodedError
	switch {
	case err == nil:
		return callbackResponse(http.StatusOK, "Connected", "ev.energy user "+pending.User+" is connected. You can close this page.")
	case errors.Is(err, logical.ErrReadOnly):
		return nil, err // Vault forwards the request to the active node
	case errors.As(err, &coded):
		return callbackResponse(coded.Code(), "Not connected", err.Error())
	default:
		return nil, err
	}
}

func callbackResponse(status int, title, message string) (*logical.Response, error) {
	var page bytes.Buffer
	if err := callbackPage.Execute(&page, map[string]string{"Title": title, "Message": message}); err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		logical.HTTPStatusCode:         status,
		logical.HTTPContentType:        "text/html; charset=utf-8",
		logical.HTTPRawBody:            page.Bytes(),
		logical.HTTPCacheControlHeader: "no-store",
	}}, nil
}
