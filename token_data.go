package evenergy

import (
	"time"

	"golang.org/x/oauth2"
)

// tokenData is what a reader gets of a token: never its refresh token.
func tokenData(accessToken, tokenType, scope string, expiresAt time.Time) map[string]any {
	return map[string]any{
		"access_token": accessToken,
		"token_type":   tokenType,
		"scope":        scope,
		"expires_at":   expiresAt.Format(time.RFC3339),
	}
}

// tokenScope is the scope ev.energy granted, which it returns beside the token.
func tokenScope(tok *oauth2.Token) string {
	scope, _ := tok.Extra("scope").(string)
	return scope
}
