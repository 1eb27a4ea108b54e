package evenergy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// selfMadeLinkPrefix marks, by state, the pending links Vault entities made for themselves: they
// live in their users' folders, where nothing tells them from the others without reading each.
// With the held grants, they count against the mount-wide bound of the config's max_self_service_links.
const selfMadeLinkPrefix = "self-made-links/"

const defaultMaxSelfServiceLinks = 10000

// selfMadeLink is the mark of one pending self-made link: no secret, only until when it counts.
type selfMadeLink struct {
	ExpiresAt time.Time `json:"expires_at"`
}

// maxSelfServiceLinks is the bound in force on self-made links pending or held, mount-wide.
func (c *config) maxSelfServiceLinks() int {
	if c.MaxSelfServiceLinks <= 0 {
		return defaultMaxSelfServiceLinks
	}
	return c.MaxSelfServiceLinks
}

// checkSelfServiceRoom answers 429 when the mount holds its bound of self-made links, pending or held.
func (b *backend) checkSelfServiceRoom(ctx context.Context, s logical.Storage, cfg *config) error {
	marks, err := b.selfMadeLinks.all(ctx, s)
	if err != nil {
		return err
	}
	held, err := b.unconfirmed.all(ctx, s)
	if err != nil {
		return err
	}
	now, n := time.Now(), len(held)
	for _, m := range marks {
		if now.Before(m.ExpiresAt) {
			n++
		}
	}
	if n >= cfg.maxSelfServiceLinks() {
		return logical.CodedError(http.StatusTooManyRequests, fmt.Sprintf("this mount holds %d links Vault entities made for themselves, pending or waiting for a confirmation code, its bound (config max_self_service_links): "+
			"try again in 10 minutes, when the oldest have expired, or ask an operator to raise the bound", n))
	}
	return nil
}

// forgetExpiredSelfMadeLinks deletes the marks of self-made links that have expired, until deadline.
func (b *backend) forgetExpiredSelfMadeLinks(ctx context.Context, s logical.Storage, deadline time.Time) error {
	marks, err := b.selfMadeLinks.all(ctx, s)
	if err != nil {
		return err
	}
	var errs []error
	for state, m := range marks {
		if ctx.Err() != nil || !time.Now().Before(deadline) {
			break
		}
		if time.Now().After(m.ExpiresAt) {
			errs = append(errs, b.selfMadeLinks.delete(ctx, s, state))
		}
	}
	return errors.Join(errs...)
}
