package evenergy

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

const (
	configPath            = "config"
	defaultBaseURL        = "https://api.ev.energy"
	defaultRequestTimeout = 30 * time.Second
	defaultRefreshWindow  = 10 * time.Minute
	maxDisplayName        = 100
)

// config is the ev.energy OAuth client the engine acts as.
type config struct {
	ClientID       string        `json:"client_id"`
	ClientSecret   string        `json:"client_secret"`
	BaseURL        string        `json:"base_url"`
	Scopes         []string      `json:"scopes"`
	RequestTimeout time.Duration `json:"request_timeout"`
	RefreshWindow  time.Duration `json:"refresh_window"`
	// CheckGrantsBefore makes the active grants last refreshed before it due (check-grants).
	CheckGrantsBefore time.Time `json:"check_grants_before,omitzero"`
	CallBudget        int       `json:"call_budget"` // 0, as in configs stored before it existed: defaultCallBudget
	// CallbackURL is this mount's callback as browsers reach it: a plugin sees neither Vault's
	// address nor the request's host. "" until an operator writes it: no link goes to the callback.
	CallbackURL string `json:"callback_url,omitempty"`
	// MaxSelfServiceLinks bounds the self-made links pending or held on the mount; 0: the default.
	MaxSelfServiceLinks int    `json:"max_self_service_links,omitempty"`
	DisplayName         string `json:"display_name,omitempty"` // the application's name on the callback page; "": client_id

	digest string // secretDigest, kept by the cached config: a shared read checks it every time
}

// secretDigest is the hex SHA-256 of the client secret, which a shared token's fingerprint holds in
// place of the secret.
func (c *config) secretDigest() string {
	if c.digest != "" {
		return c.digest
	}
	sum := sha256.Sum256([]byte(c.ClientSecret))
	return hex.EncodeToString(sum[:])
}

// callsPerSecond is the call_budget in force: how many calls a second refreshes and revocations
// make to ev.energy on one node.
func (c *config) callsPerSecond() int {
	if c.CallBudget <= 0 {
		return defaultCallBudget
	}
	return c.CallBudget
}

func pathConfig(b *backend) *framework.Path {
	configure := &framework.PathOperation{
		Callback:     b.pathConfigWrite,
		Summary:      "Configure the ev.energy client: client_id, client_secret, base_url, scopes and timings.",
		DisplayAttrs: &framework.DisplayAttributes{OperationVerb: "configure"},
	}
	return &framework.Path{
		Pattern: configPath,
		Fields: map[string]*framework.FieldSchema{
			"client_id": {
				Type:        framework.TypeString,
				Description: "Client ID of the ev.energy OAuth application. Required.",
			},
			"client_secret": {
				Type:        framework.TypeString,
				Description: "Client secret of the ev.energy OAuth application; needed for client-credentials tokens. Never read back.",
				DisplayAttrs: &framework.DisplayAttributes{
					Sensitive: true,
				},
			},
			"base_url": {
				Type:        framework.TypeString,
				Description: "Base URL of the ev.energy API; must be https:// unless the host is loopback.",
				Default:     defaultBaseURL,
			},
			"scopes": {
				Type:        framework.TypeCommaStringSlice,
				Description: "Scopes asked for when a role or request names none; empty asks for all of the application's scopes.",
			},
			"request_timeout": {
				Type:        framework.TypeDurationSecond,
				Description: "How long one call to ev.energy may take.",
				Default:     int(defaultRequestTimeout.Seconds()),
			},
			"refresh_window": {
				Type:        framework.TypeDurationSecond,
				Description: "A user's access token is refreshed once less than this remains of it, fixed when the token is issued (a write applies to tokens issued after it); a window at least as long as a token's life counts as half of it.",
				Default:     int(defaultRefreshWindow.Seconds()),
			},
			"callback_url": {
				Type: framework.TypeString,
				Description: "This mount's callback as users' browsers reach it, in full: https://VAULT/v1/<namespace/><mount>/callback. " +
					"Links Vault entities make for themselves go only there; until it is set, auth-url refuses them.",
			},
			"display_name": {
				Type:        framework.TypeString,
				Description: "The application's name as ev.energy shows it on its consent page, for the callback page; empty shows client_id.",
			},
			"max_self_service_links": {
				Type:        framework.TypeInt,
				Description: "How many links Vault entities made for themselves the mount keeps, pending or waiting for a confirmation code; auth-url answers 429 beyond. 0 means the default, 10000.",
				Default:     0,
			},
			"call_budget": {
				Type: framework.TypeInt,
				Description: "Calls a second this mount may make to ev.energy on each node for users' token refreshes and revocations, " +
					"shared by every grant: refreshes that readers wait for go first, the background pass uses what is left. 0 means the default, 20.",
				Default: 0,
			},
		},
		ExistenceCheck: b.configExists,
		DisplayAttrs:   &framework.DisplayAttributes{OperationPrefix: operationPrefix, OperationSuffix: "configuration"},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{
				Callback: b.pathConfigRead,
				Summary:  "Read the ev.energy client's configuration, without its secret.",
			},
			logical.CreateOperation: configure,
			logical.UpdateOperation: configure,
			logical.DeleteOperation: &framework.PathOperation{
				Callback: b.pathConfigDelete,
				Summary:  "Delete the configuration.",
			},
		},
		HelpSynopsis:    "Configure the ev.energy OAuth client.",
		HelpDescription: "Stores the client_id and client_secret of the ev.energy OAuth application, the API's base URL and default scopes. The client secret is never returned.",
	}
}

const notConfigured = "the engine is not configured: write client_id and client_secret to its config path first"

// getConfig returns the stored config, or a 400 error telling the operator to write one.
func getConfig(ctx context.Context, s logical.Storage) (*config, error) {
	cfg, err := getJSON[config](ctx, s, configPath)
	if err == nil && cfg == nil {
		err = logical.CodedError(http.StatusBadRequest, notConfigured)
	}
	return cfg, err
}

func (b *backend) configExists(ctx context.Context, req *logical.Request, _ *framework.FieldData) (bool, error) {
	entry, err := req.Storage.Get(ctx, configPath)
	return entry != nil, err
}

func (b *backend) pathConfigRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	cfg, err := getJSON[config](ctx, req.Storage, configPath)
	if err != nil || cfg == nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		"client_id":              cfg.ClientID,
		"base_url":               cfg.BaseURL,
		"scopes":                 cfg.Scopes,
		"request_timeout":        int64(cfg.RequestTimeout.Seconds()),
		"refresh_window":         int64(cfg.RefreshWindow.Seconds()),
		"call_budget":            cfg.callsPerSecond(),
		"callback_url":           cfg.CallbackURL,
		"max_self_service_links": cfg.maxSelfServiceLinks(),
		"display_name":           cfg.DisplayName,
	}}, nil
}

func (b *backend) pathConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	b.configWrites.Lock()
	defer b.configWrites.Unlock()
	previous, err := getJSON[config](ctx, req.Storage, configPath)
	if err != nil {
		return nil, err
	}
	cfg := &config{}
	if req.Operation == logical.UpdateOperation {
		if previous == nil {
			return nil, logical.CodedError(http.StatusBadRequest, notConfigured)
		}
		*cfg = *previous
	}
	previousClientID := cfg.ClientID
	if v, ok := fieldOnWrite(req, d, "client_id"); ok {
		cfg.ClientID = strings.TrimSpace(v.(string))
	}
	secret, secretGiven := fieldOnWrite(req, d, "client_secret")
	if secretGiven {
		cfg.ClientSecret = strings.TrimSpace(secret.(string)) // as trimmedField does
	} else if cfg.ClientID != previousClientID {
		return logical.ErrorResponse("client_id changes from %s to %s: give client_secret too (empty for a public client), so that the previous client's secret is not kept", previousClientID, cfg.ClientID), nil
	}
	if v, ok := fieldOnWrite(req, d, "base_url"); ok {
		cfg.BaseURL = strings.TrimRight(v.(string), "/")
	}
	if v, ok := fieldOnWrite(req, d, "scopes"); ok {
		cfg.Scopes = v.([]string)
	}
	if v, ok := fieldOnWrite(req, d, "request_timeout"); ok {
		cfg.RequestTimeout = time.Duration(v.(int)) * time.Second
	}
	if v, ok := fieldOnWrite(req, d, "refresh_window"); ok {
		cfg.RefreshWindow = time.Duration(v.(int)) * time.Second
	}
	if v, ok := fieldOnWrite(req, d, "call_budget"); ok {
		cfg.CallBudget = v.(int)
	}
	if v, ok := fieldOnWrite(req, d, "display_name"); ok {
		cfg.DisplayName = strings.TrimSpace(v.(string))
	}
	if v, ok := fieldOnWrite(req, d, "max_self_service_links"); ok {
		cfg.MaxSelfServiceLinks = v.(int)
	}
	if v, ok := fieldOnWrite(req, d, "callback_url"); ok {
		cfg.CallbackURL = strings.TrimSpace(v.(string))
	}

	if cfg.ClientID == "" {
		return logical.ErrorResponse("client_id is required"), nil
	}
	if err := checkURL("base_url", cfg.BaseURL); err != nil {
		return logical.ErrorResponse(err.Error()), nil
	}
	if cfg.RequestTimeout <= 0 {
		return logical.ErrorResponse("request_timeout must be a positive duration, e.g. 30s"), nil
	}
	if cfg.RefreshWindow <= 0 {
		return logical.ErrorResponse("refresh_window must be a positive duration, e.g. 10m"), nil
	}
	if err := checkCallbackURL(cfg.CallbackURL, req.MountPoint); err != nil {
		return logical.ErrorResponse(err.Error()), nil
	}
	if len(cfg.DisplayName) > maxDisplayName {
		return logical.ErrorResponse("display_name must be at most %d bytes: the name ev.energy shows on its consent page", maxDisplayName), nil
	}
	if cfg.MaxSelfServiceLinks < 0 {
		return logical.ErrorResponse("max_self_service_links must be a number of links, or 0 for the default (%d)", defaultMaxSelfServiceLinks), nil
	}
	if cfg.CallBudget < 0 || cfg.CallBudget > maxCallBudget {
		return logical.ErrorResponse("call_budget must be a number of calls a second from 1 to %d, or 0 for the default (%d)", maxCallBudget, defaultCallBudget), nil
	}

	if previous != nil && previous.ClientID != cfg.ClientID {
		// The previous client's tokens and grants may still be alive: only it can revoke them.
		if err := b.retireClient(ctx, req.Storage, previous); err != nil {
			return nil, err
		}
	}
	if err := b.putConfig(ctx, req.Storage, cfg); err != nil {
		return nil, err
	}
	// Only once the config holds them: a refused config write must not lose a retired client's credentials.
	unretired := b.unretireClient(ctx, req.Storage, cfg.ClientID)
	if previous == nil || !mintsOtherwise(previous, cfg) {
		return nil, unretired
	}
	return nil, errors.Join(unretired, b.endSharedTokens(ctx, req.Storage))
}

// mintsOtherwise reports whether tokens minted under cfg differ from those minted under previous:
// another client, secret or default scopes.
func mintsOtherwise(previous, cfg *config) bool {
	return previous.ClientID != cfg.ClientID || previous.ClientSecret != cfg.ClientSecret || !slices.Equal(previous.Scopes, cfg.Scopes)
}

// putConfig stores the config, which every node then reads anew.
func (b *backend) putConfig(ctx context.Context, s logical.Storage, cfg *config) error {
	defer b.cache.invalidate(configPath)
	return putJSON(ctx, s, configPath, cfg)
}

func (b *backend) pathConfigDelete(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	b.configWrites.Lock()
	defer b.configWrites.Unlock()
	previous, err := getJSON[config](ctx, req.Storage, configPath)
	if err != nil || previous == nil {
		return nil, err
	}
	if err := b.retireClient(ctx, req.Storage, previous); err != nil {
		return nil, err
	}
	defer b.cache.invalidate(configPath)
	return nil, req.Storage.Delete(ctx, configPath)
}
