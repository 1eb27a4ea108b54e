package evenergy

import (
	"context"
	"errors"
	"net/http"
	"strconv"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// respondToCodedErrors makes every path operation answer a logical.HTTPCodedError as Vault's CLI
// and API show it best. Secrets' Renew and Revoke handlers are not paths, so they keep their errors:
// Vault makes a lease irrevocable at once when its Revoke returns logical.ErrInvalidRequest.
func respondToCodedErrors(paths []*framework.Path) {
	for _, p := range paths {
		for _, handler := range p.Operations {
			op := handler.(*framework.PathOperation)
			op.Callback = withCodedErrorResponse(op.Callback)
		}
		for operation, callback := range p.Callbacks {
			p.Callbacks[operation] = withCodedErrorResponse(callback)
		}
	}
}

// withCodedErrorResponse answers a coded 400 as an error response, which Vault prints as its one
// line. Vault wraps any other error in a list ("1 error occurred"), but only an error keeps a status
// other than 400: 429 and 502 stay errors, a 429 with ev.energy's Retry-After as a header (Vault
// passes it on where the mount's allowed_response_headers name it).
func withCodedErrorResponse(callback framework.OperationFunc) framework.OperationFunc {
	return func(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
		resp, err := callback(ctx, req, d)
		var coded logical.HTTPCodedError
		if !errors.As(err, &coded) {
			return resp, err
		}
		if coded.Code() == http.StatusBadRequest {
			return logical.ErrorResponse(err.Error()), logical.ErrInvalidRequest
		}
		var upstream *upstreamError
		if errors.As(err, &upstream) && upstream.RetryAfter > 0 {
			if resp == nil {
				resp = &logical.Response{}
			}
			resp.Headers = map[string][]string{"Retry-After": {strconv.Itoa(int(upstream.RetryAfter.Seconds()))}}
		}
		return resp, err
	}
}
