package standin

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"
)

// FaultKind is a way the token endpoint can fail, for tests of how a client copes.
type FaultKind int

const (
	FaultNone            FaultKind = iota // the token endpoint answers as usual
	FaultRateLimited                      // 429 with Retry-After and a DRF throttling body {"detail": "..."}, not an OAuth error
	FaultServerError                      // 500 with Django's HTML "Server Error (500)" page
	FaultGarbage                          // 200 with an HTML maintenance page where JSON belongs
	FaultHang                             // holds the request and never answers, until the client gives up or SetFault is called
	FaultHangUp                           // closes the connection without any response
	FaultIssueThenHangUp                  // handles the request as usual (issuing tokens) and then closes the connection without the response
)

// Fault is the fault SetFault puts on the token endpoint.
type Fault struct {
	Kind       FaultKind
	RetryAfter time.Duration // for FaultRateLimited; sent rounded up to whole seconds
	Count      int           // how many token requests get the fault; 0 (or less) = every request until SetFault(Fault{})
	Share      float64       // the share of token requests that get the fault, drawn at random from Seed; 0 = every one
	Seed       uint64
}

// SetFault makes token requests (/o/token and /o/token/) fail as f says; requests held by FaultHang
// or HangRefreshToken are then hung up on, and HangRefreshToken's tokens refresh again.
func (s *Server) SetFault(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.Count < 0 {
		f.Count = 0
	}
	s.fault = f
	clear(s.hungRefreshes)
	s.draws = rand.New(rand.NewPCG(f.Seed, f.Seed))
	close(s.release)
	s.release = make(chan struct{})
}

// HangRefreshToken holds every refresh request presenting refreshToken, as FaultHang holds every
// request, until the client gives up or SetFault is called: one user's refresh hangs while the
// stand-in answers everyone else.
func (s *Server) HangRefreshToken(refreshToken string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hungRefreshes[refreshToken] = true
}

// Held returns how many token requests FaultHang and HangRefreshToken hold.
func (s *Server) Held() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held
}

// SetLatency delays every token endpoint answer by d; concurrent requests wait in parallel.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = d
}

// SetRedirect makes the token and revocation endpoints answer 307 Temporary Redirect to the same
// path at target (a base URL such as a second listener's), which keeps the method and body, as a
// misconfigured proxy might; "" answers as usual again.
func (s *Server) SetRedirect(target string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.redirect = strings.TrimRight(target, "/")
}

// redirected answers a token or revocation request with SetRedirect's redirect, if one is set.
func (s *Server) redirected(w http.ResponseWriter, r *http.Request) bool {
	s.mu.Lock()
	target := s.redirect
	s.mu.Unlock()
	if target == "" || !strings.HasPrefix(r.URL.Path, "/o/token") && !strings.HasPrefix(r.URL.Path, "/o/revoke_token") {
		return false
	}
	http.Redirect(w, r, target+r.URL.Path, http.StatusTemporaryRedirect)
	return true
}

// TokenRequests returns how many requests the token endpoint has received, answered or not.
func (s *Server) TokenRequests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests
}

// RepeatedRefreshTokens returns how many refresh requests presented a refresh token that an
// earlier request had presented: a client sending a rotated token again, or retrying after a fault.
func (s *Server) RepeatedRefreshTokens() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.repeated
}

// takeFault returns the fault for a token request that has just arrived, counting it against
// Fault.Count, and the channel SetFault closes to release a held request; call it with s.mu held.
func (s *Server) takeFault() (Fault, <-chan struct{}) {
	f := s.fault
	if f.Share > 0 && s.draws.Float64() >= f.Share {
		return Fault{}, s.release // spared by the draw
	}
	if f.Kind != FaultNone && f.Count > 0 {
		s.fault.Count--
		if s.fault.Count == 0 {
			s.fault = Fault{}
		}
	}
	return f, s.release
}

// answerFault writes the answer of the faults that issue nothing and reports whether f was one.
func answerFault(w http.ResponseWriter, f Fault) bool {
	switch f.Kind {
	case FaultRateLimited:
		// Django REST framework's Throttled exception, as django-ratelimit setups answer too.
		wait := int64((f.RetryAfter + time.Second - 1) / time.Second)
		if wait < 0 {
			wait = 0
		}
		unit := "seconds"
		if wait == 1 {
			unit = "second"
		}
		w.Header().Set("Retry-After", fmt.Sprint(wait))
		writeJSON(w, http.StatusTooManyRequests, map[string]string{
			"detail": fmt.Sprintf("Request was throttled. Expected available in %d %s.", wait, unit),
		})
	case FaultServerError:
		writeHTML(w, http.StatusInternalServerError, serverErrorPage)
	case FaultGarbage:
		writeHTML(w, http.StatusOK, maintenancePage)
	case FaultHangUp:
		hangUp(w)
	default:
		return false
	}
	return true
}

// hold keeps a FaultHang or HangRefreshToken request unanswered until the client goes away or release is closed,
// and then hangs up on it.
func (s *Server) hold(w http.ResponseWriter, r *http.Request, release <-chan struct{}) {
	io.Copy(io.Discard, r.Body) // postForm may have left some: net/http watches the connection only after the body
	s.mu.Lock()
	s.held++
	s.mu.Unlock()
	select {
	case <-r.Context().Done():
	case <-release:
	}
	s.mu.Lock()
	s.held--
	s.mu.Unlock()
	hangUp(w)
}

// hangUp closes the connection of w without writing a response.
func hangUp(w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		// HTTP/2, or a ResponseWriter that cannot be hijacked: net/http aborts the response.
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}

func writeHTML(w http.ResponseWriter, status int, page string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprint(w, page)
}

// serverErrorPage is Django's default 500 page (django.views.defaults.server_error).
const serverErrorPage = `<!doctype html>
<html lang="en">
<head>
  <title>Server Error (500)</title>
</head>
<body>
  <h1>Server Error (500)</h1><p></p>
</body>
</html>
`

// maintenancePage is what a proxy in front of ev.energy might serve during maintenance.
const maintenancePage = `<!DOCTYPE html>
<html>
<head><title>ev.energy: down for maintenance</title></head>
<body>
<h1>We'll be back soon</h1>
<p>ev.energy is down for scheduled maintenance. Please try again later.</p>
</body>
</html>
`
