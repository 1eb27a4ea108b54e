package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// kind says how a row compares with the others.
type kind int

const (
	builtin kind = iota // inside Vault, unleased
	floor               // the leased no-op plugin every engine row is compared with
	engine              // this engine
	minting             // this engine, minting a token at the stand-in on every read
	direct              // the stand-in's token endpoint without Vault
)

// target is one row of the table: a read to time.
type target struct {
	name string
	path string // the Vault path read, or the stand-in's endpoint
	kind kind
	read func(context.Context) error
}

// timings are one target's measurements over all rounds.
type timings struct {
	alone      []time.Duration // latency of each read made by a single client
	burstReads int
	burstTime  time.Duration // wall time of the concurrent bursts
}

// plan is how many reads each round makes of every target.
type plan struct {
	rounds, alone, burst, clients int
	between                       func(context.Context) error // after each round, untimed
}

// measure runs the rounds: each times every target alone and then in a burst, starting one target
// further along each round, so that noise on the machine spreads over all the rows.
func measure(ctx context.Context, targets []target, p plan) ([]timings, error) {
	for _, t := range targets { // warm the connections and the plugins
		if err := concurrently(2*p.clients, p.clients, func(int) error { return t.read(ctx) }); err != nil {
			return nil, fmt.Errorf("%s: %w", t.name, err)
		}
	}
	results := make([]timings, len(targets))
	for round := range p.rounds {
		fmt.Fprintf(os.Stderr, "round %d of %d\n", round+1, p.rounds)
		for k := range targets {
			i := (round + k) % len(targets)
			if err := results[i].add(ctx, targets[i].read, p); err != nil {
				return nil, fmt.Errorf("%s: %w", targets[i].name, err)
			}
		}
		if err := p.between(ctx); err != nil {
			return nil, err
		}
	}
	return results, nil
}

func (r *timings) add(ctx context.Context, read func(context.Context) error, p plan) error {
	for range p.alone {
		start := time.Now()
		if err := read(ctx); err != nil {
			return err
		}
		r.alone = append(r.alone, time.Since(start))
	}
	start := time.Now()
	if err := concurrently(p.burst, p.clients, func(int) error { return read(ctx) }); err != nil {
		return err
	}
	r.burstTime += time.Since(start)
	r.burstReads += p.burst
	return nil
}

// concurrently calls do(1) to do(n) from that many workers; a worker stops at its first error.
func concurrently(n, workers int, do func(i int) error) error {
	var next atomic.Int64
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := next.Add(1); i <= int64(n); i = next.Add(1) {
				if errs[w] = do(int(i)); errs[w] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// row is a target's results as reported.
type row struct {
	Name           string   `json:"name"`
	Path           string   `json:"path"`
	P50Ms          float64  `json:"p50_ms"`
	P99Ms          float64  `json:"p99_ms"`
	ReqPerSec      float64  `json:"req_per_sec"`
	P50VsFloor     *float64 `json:"p50_vs_floor,omitempty"`
	ReqPerSecFloor *float64 `json:"req_per_sec_vs_floor,omitempty"`
	// ExtraMs is X in p50 = floor + direct POST + X, for the rows that mint a token.
	ExtraMs *float64 `json:"extra_ms_over_floor_and_post,omitempty"`
}

func summarize(targets []target, results []timings) []row {
	rows := make([]row, len(targets))
	for i, r := range results {
		alone := slices.Sorted(slices.Values(r.alone))
		rows[i] = row{
			Name:      targets[i].name,
			Path:      targets[i].path,
			P50Ms:     ms(percentile(alone, 0.50)),
			P99Ms:     ms(percentile(alone, 0.99)),
			ReqPerSec: float64(r.burstReads) / r.burstTime.Seconds(),
		}
	}
	base := rows[slices.IndexFunc(targets, func(t target) bool { return t.kind == floor })]
	post := rows[slices.IndexFunc(targets, func(t target) bool { return t.kind == direct })]
	for i, t := range targets {
		if t.kind == engine || t.kind == minting {
			rows[i].P50VsFloor = ptr(rows[i].P50Ms / base.P50Ms)
			rows[i].ReqPerSecFloor = ptr(rows[i].ReqPerSec / base.ReqPerSec)
		}
		if t.kind == minting {
			rows[i].ExtraMs = ptr(rows[i].P50Ms - base.P50Ms - post.P50Ms)
		}
	}
	return rows
}

// percentile is the nearest-rank percentile of sorted latencies.
func percentile(sorted []time.Duration, p float64) time.Duration {
	return sorted[int(math.Ceil(p*float64(len(sorted))))-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func ptr(f float64) *float64 { return &f }
