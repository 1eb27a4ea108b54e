package evenergy

import (
	"context"
	"net/http"
	"slices"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

const rolePrefix = "roles/"

// role narrows what one application gets from evenergy/token/<role>.
type role struct {
	Scopes []string      `json:"scopes"`
	TTL    time.Duration `json:"ttl"`
	MaxTTL time.Duration `json:"max_ttl"`
	Shared bool          `json:"shared"` // every reader gets the role's one token (sharedRole), not a new one
}

// tokenScopes are the scopes the role's tokens are minted with: its own, or else the config's.
func (r *role) tokenScopes(cfg *config) []string {
	if len(r.Scopes) == 0 {
		return cfg.Scopes
	}
	return r.Scopes
}

func pathRoles(b *backend) []*framework.Path {
	write := &framework.PathOperation{Callback: b.pathRoleWrite, Summary: "Create or update a role: the scopes and lease TTLs of an application's tokens."}
	return []*framework.Path{
		{
			Pattern: rolePrefix + roleField("name"),
			Fields: map[string]*framework.FieldSchema{
				"name":    {Type: framework.TypeLowerCaseString, Description: "Name of the role.", Required: true},
				"scopes":  {Type: framework.TypeCommaStringSlice, Description: "Scopes of this role's tokens; empty uses the config's scopes."},
				"ttl":     {Type: framework.TypeDurationSecond, Description: "Lease TTL of this role's tokens; 0 uses the mount's default. Never past the token's own expiry."},
				"max_ttl": {Type: framework.TypeDurationSecond, Description: "Maximum lease TTL of this role's tokens; 0 uses the mount's maximum. Never past the token's own expiry."},
				"shared":  {Type: framework.TypeBool, Default: false, Description: "Give every reader the role's one token, replaced before it expires, under leases that end by then and are not renewable; false mints a token per read."},
			},
			ExistenceCheck: b.roleExists,
			DisplayAttrs:   &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "role"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ReadOperation:   &framework.PathOperation{Callback: b.pathRoleRead, Summary: "Read a role."},
				logical.CreateOperation: write,
				logical.UpdateOperation: write,
				logical.DeleteOperation: &framework.PathOperation{Callback: b.pathRoleDelete, Summary: "Delete a role."},
			},
			HelpSynopsis:    "Manage roles: the scopes and lease TTLs of an application's tokens.",
			HelpDescription: "A role lets each application ask for only the ev.energy scopes it needs. Read evenergy/token/<role> to get a token with them.",
		},
		{
			Pattern: "rotate-role/" + roleField("name"),
			Fields: map[string]*framework.FieldSchema{
				"name": {Type: framework.TypeLowerCaseString, Description: "Name of the shared role.", Required: true},
			},
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationVerb: "rotate", OperationSuffix: "role"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRoleRotate, Summary: "Revoke a shared role's token at ev.energy now; the next read mints a new one."},
			},
			HelpSynopsis:    "End a shared role's token at once (an incident, a leak).",
			HelpDescription: "Revokes the shared role's token at ev.energy now, or queues its revocation when ev.energy does not confirm, and the next read of token/<role> mints a new one. Leases already handed out still point at the revoked token until they end.",
		},
		{
			Pattern:      rolePrefix + "?$",
			DisplayAttrs: &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "roles"},
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: b.pathRoleList, Summary: "List the roles."},
			},
			HelpSynopsis:    "List the roles.",
			HelpDescription: "Lists the names of the roles.",
		},
	}
}

// getRole returns the named role, or a 400 error when there is none.
func getRole(ctx context.Context, s logical.Storage, name string) (*role, error) {
	r, err := getJSON[role](ctx, s, rolePrefix+name)
	if err == nil && r == nil {
		err = logical.CodedError(http.StatusBadRequest, "role "+name+" does not exist: write it to roles/"+name+" first")
	}
	return r, err
}

func (b *backend) roleExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	entry, err := req.Storage.Get(ctx, rolePrefix+d.Get("name").(string))
	return entry != nil, err
}

func (b *backend) pathRoleRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	r, err := getJSON[role](ctx, req.Storage, rolePrefix+d.Get("name").(string))
	if err != nil || r == nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		"scopes":  r.Scopes,
		"ttl":     int64(r.TTL.Seconds()),
		"max_ttl": int64(r.MaxTTL.Seconds()),
		"shared":  r.Shared,
	}}, nil
}

func (b *backend) pathRoleWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	r := &role{}
	if req.Operation == logical.UpdateOperation {
		var err error
		if r, err = getRole(ctx, req.Storage, name); err != nil {
			return nil, err
		}
	}
	previousScopes := r.Scopes
	if v, ok := fieldOnWrite(req, d, "scopes"); ok {
		r.Scopes = v.([]string)
	}
	if v, ok := fieldOnWrite(req, d, "ttl"); ok {
		r.TTL = time.Duration(v.(int)) * time.Second
	}
	if v, ok := fieldOnWrite(req, d, "max_ttl"); ok {
		r.MaxTTL = time.Duration(v.(int)) * time.Second
	}
	if v, ok := fieldOnWrite(req, d, "shared"); ok {
		r.Shared = v.(bool)
	}
	if r.MaxTTL > 0 && r.TTL > r.MaxTTL {
		return logical.ErrorResponse("ttl must not be greater than max_ttl"), nil
	}
	err := putJSON(ctx, req.Storage, rolePrefix+name, r)
	b.cache.invalidate(rolePrefix + name)
	if err != nil || (r.Shared && slices.Equal(r.Scopes, previousScopes)) {
		return nil, err
	}
	// No longer shared, or minted for other scopes: revoked once its leases end; a read mints anew.
	_, err = b.endSharedToken(ctx, req.Storage, name, false)
	return nil, err
}

func (b *backend) pathRoleDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	err := req.Storage.Delete(ctx, rolePrefix+name)
	b.cache.invalidate(rolePrefix + name)
	if err != nil {
		return nil, err
	}
	b.tokens.refreshes.forget(sharedTokenPrefix + name) // a failed first mint's record, which no stored token's delete drops
	return warningResponse(b.endSharedToken(ctx, req.Storage, name, true))
}

// pathRoleRotate ends a shared role's token now; the next read mints a new one.
func (b *backend) pathRoleRotate(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	if r, err := b.role(ctx, req.Storage, name); err != nil {
		return nil, err
	} else if !r.Shared {
		return logical.ErrorResponse("role %s is not shared: each read gets a token of its own, which ends with its lease (vault lease revoke)", name), nil
	}
	return warningResponse(b.endSharedToken(ctx, req.Storage, name, true))
}

// warningResponse answers warnings, or err.
func warningResponse(warnings []string, err error) (*logical.Response, error) {
	if err != nil || len(warnings) == 0 {
		return nil, err
	}
	return &logical.Response{Warnings: warnings}, nil
}

func (b *backend) pathRoleList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	names, err := req.Storage.List(ctx, rolePrefix)
	if err != nil {
		return nil, err
	}
	return logical.ListResponse(names), nil
}
