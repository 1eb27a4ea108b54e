// Command evenergy-standin serves a stand-in for ev.energy's OAuth 2 server for `make dev`, with
// one registered client that may use any redirect URI.
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/evenergy/vault-plugin-secrets-evenergy/internal/standin"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8400", "address to serve on")
	clientID := flag.String("client-id", "dev-client", "client ID of the registered client")
	clientSecret := flag.String("client-secret", "dev-secret", "client secret of the registered client (empty: a public client)")
	scopes := flag.String("scopes", "charging_session:read vehicle:read", "space separated scopes of the registered client")
	lifetime := flag.Duration("token-lifetime", 36000*time.Second, "lifetime (expires_in) of access tokens")
	latency := flag.Duration("latency", 0, "delay of every token endpoint answer, e.g. 50ms")
	flag.Parse()

	s := standin.New()
	s.SetTokenLifetime(*lifetime)
	s.SetLatency(*latency)
	s.AddClient(standin.Client{ID: *clientID, Secret: *clientSecret, Scopes: strings.Fields(*scopes)})
	if err := serve(*listen, s); err != nil {
		log.Fatal(err)
	}
}

// serve serves h on addr until SIGINT or SIGTERM.
func serve(addr string, h http.Handler) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: logRequests(h), ReadHeaderTimeout: 10 * time.Second}
	log.Printf("ev.energy stand-in serving http://%s/o/", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Print("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// logRequests logs method, path and status of each request: never the query or body, which
// carry codes, verifiers, secrets and tokens.
func logRequests(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		h.ServeHTTP(sw, r)
		log.Printf("%s %q %d", r.Method, r.URL.Path, sw.status)
	})
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(status int) {
	w.status = status
	w.ResponseWriter.WriteHeader(status)
}

// Unwrap lets http.ResponseController reach the connection (the stand-in hijacks it to hang up).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
