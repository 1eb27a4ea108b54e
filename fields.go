package evenergy

import (
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// Names of users and roles are path segments and storage keys: a dot only between other
// characters, as ".." is a relative path that Vault's storage refuses.
const (
	userName = `\w[\w@+-]*(?:\.[\w@+-]+)*` // e.g. driver-42, ada.driver@example.com, a Vault entity ID
	roleName = `\w[\w-]*(?:\.[\w-]+)*`
)

var (
	userNamePattern = regexp.MustCompile("^" + userName + "$")
	userField       = "(?P<user>" + userName + ")"
)

// roleField is a role name in a path pattern, captured as field.
func roleField(field string) string { return "(?P<" + field + ">" + roleName + ")" }

// fieldOnWrite returns a field the request sets, or its default when the request creates the entry.
func fieldOnWrite(req *logical.Request, d *framework.FieldData, name string) (any, bool) {
	if v, ok := d.GetOk(name); ok {
		return v, true
	}
	return d.Get(name), req.Operation == logical.CreateOperation
}

// trimmedField returns a string field without surrounding whitespace: `@file` and `-` values keep
// the trailing newline of the file or stdin, which ev.energy would refuse as part of a credential.
func trimmedField(d *framework.FieldData, name string) string {
	return strings.TrimSpace(d.Get(name).(string))
}

// checkURL accepts an absolute https:// URL, or http:// for a loopback host only.
func checkURL(field, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || strings.ContainsAny(raw, "?#") { // url.Parse hides an empty query or fragment
		return fmt.Errorf("%s must be an absolute URL such as https://api.ev.energy, without query or fragment", field)
	}
	if u.User != nil {
		return fmt.Errorf("%s must not carry user info (user:password@): Vault would show it to anyone who reads it", field)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopback(u.Hostname()) {
			return nil
		}
	}
	return fmt.Errorf("%s must use https:// (http:// is allowed only for localhost and loopback addresses)", field)
}

// checkCallbackURL checks a config's callback_url ("" unsets it): this mount's callback, in full.
func checkCallbackURL(raw, mountPoint string) error {
	if raw == "" {
		return nil
	}
	if err := checkURL("callback_url", raw); err != nil {
		return err
	}
	if u, _ := url.Parse(raw); !strings.HasSuffix(u.Path, "/"+mountPoint+"callback") {
		return fmt.Errorf("callback_url must be this mount's callback as browsers reach it, e.g. https://vault.example.com/v1/%scallback (with the namespace path before the mount, if any)", mountPoint)
	}
	return nil
}

// sameURL reports whether a and b are one URL: scheme and host in any case, the rest exactly.
func sameURL(a, b string) bool {
	ua, errA := url.Parse(a)
	ub, errB := url.Parse(b)
	return errA == nil && errB == nil && strings.EqualFold(ua.Scheme, ub.Scheme) && strings.EqualFold(ua.Host, ub.Host) &&
		ua.User == nil && ub.User == nil && ua.EscapedPath() == ub.EscapedPath() && ua.RawQuery == ub.RawQuery && ua.Fragment == ub.Fragment
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
