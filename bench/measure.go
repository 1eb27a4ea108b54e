package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
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
	floor               // the leased no-op plugin every other row is compared with
	shaped              // the no-op plugin answering as an engine row does: what that answer costs Vault
	engine              // this engine
	minting             // minting a token at the stand-in on every read, as the engine's token paths do
	direct              // the stand-in's token endpoint without Vault
)

// target is one row of the table: a request to time.
type target struct {
	name string
	path string // the Vault path requested, or the stand-in's endpoint
	kind kind
	read func(context.Context) error
	// before, when set, runs untimed before each request of the single client, to put the machine
	// in the state in which the engine makes that request.
	before func(context.Context) error
}

// round is one target's measurements in one round.
type round struct {
	alone      []time.Duration // latency of each request made by a single client, sorted
	burstReads int
	burstTime  time.Duration // wall time of the concurrent burst
}

func (r round) reqPerSec() float64 { return float64(r.burstReads) / r.burstTime.Seconds() }

// plan is how many reads each round makes of every target.
type plan struct {
	rounds, alone, burst, clients int
	between                       func(context.Context) error // after each round, untimed
}

// measure runs the rounds: each times every target alone and then in a burst, in an order shuffled
// anew each round (seeded, so runs repeat it), so that neither noise on the machine nor what the row
// before left in a plugin's process falls on the same rows every round: with a fixed order the
// shared role's row, always after the user token's in the same process, measured 1.14x noop/token,
// and 1.00x once moved after noop/token. It returns each target's rounds.
func measure(ctx context.Context, targets []target, p plan) ([][]round, error) {
	for _, t := range targets { // warm the connections and the plugins
		if err := concurrently(2*p.clients, p.clients, func(int) error { return t.read(ctx) }); err != nil {
			return nil, fmt.Errorf("%s: %w", t.name, err)
		}
	}
	results := make([][]round, len(targets))
	for n := range p.rounds {
		fmt.Fprintf(os.Stderr, "round %d of %d\n", n+1, p.rounds)
		for _, i := range rand.New(rand.NewPCG(uint64(n), 0)).Perm(len(targets)) {
			r, err := timeRound(ctx, targets[i], p)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", targets[i].name, err)
			}
			results[i] = append(results[i], r)
		}
		if err := p.between(ctx); err != nil {
			return nil, err
		}
	}
	return results, nil
}

func timeRound(ctx context.Context, t target, p plan) (round, error) {
	var r round
	for range p.alone {
		if t.before != nil {
			if err := t.before(ctx); err != nil {
				return r, err
			}
		}
		start := time.Now()
		if err := t.read(ctx); err != nil {
			return r, err
		}
		r.alone = append(r.alone, time.Since(start))
	}
	slices.Sort(r.alone)
	start := time.Now()
	if err := concurrently(p.burst, p.clients, func(int) error { return t.read(ctx) }); err != nil {
		return r, err
	}
	r.burstTime, r.burstReads = time.Since(start), p.burst
	return r, nil
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

// row is a target's results as reported: latencies and throughput over all rounds, and each
// comparison with the floor as the median of its value in every round.
type row struct {
	Name      string  `json:"name"`
	Path      string  `json:"path"`
	P50Ms     float64 `json:"p50_ms"`
	P99Ms     float64 `json:"p99_ms"`
	ReqPerSec float64 `json:"req_per_sec"`
	// The ratios to the floor, absent in the floor's own row.
	P50VsFloor       *float64 `json:"p50_vs_floor,omitempty"`
	P99VsFloor       *float64 `json:"p99_vs_floor,omitempty"`
	ReqPerSecVsFloor *float64 `json:"req_per_sec_vs_floor,omitempty"`
	// ExtraMs is X in p50 = floor + direct POST + X, for the rows that mint a token.
	ExtraMs *float64 `json:"extra_ms_over_floor_and_post,omitempty"`
}

func summarize(targets []target, results [][]round) []row {
	base := slices.IndexFunc(targets, func(t target) bool { return t.kind == floor })
	post := slices.IndexFunc(targets, func(t target) bool { return t.kind == direct })
	// overRounds is the median over the rounds of f(round of this row, of the floor, of the POST).
	overRounds := func(rounds []round, f func(r, base, post round) float64) *float64 {
		values := make([]float64, len(rounds))
		for n, r := range rounds {
			values[n] = f(r, results[base][n], results[post][n])
		}
		m := median(values)
		return &m
	}
	rows := make([]row, len(targets))
	for i, rounds := range results {
		var alone []time.Duration
		var reads int
		var burst time.Duration
		for _, r := range rounds {
			alone = append(alone, r.alone...)
			reads += r.burstReads
			burst += r.burstTime
		}
		slices.Sort(alone)
		rows[i] = row{
			Name:      targets[i].name,
			Path:      targets[i].path,
			P50Ms:     ms(percentile(alone, 0.50)),
			P99Ms:     ms(percentile(alone, 0.99)),
			ReqPerSec: float64(reads) / burst.Seconds(),
		}
		if i == base {
			continue
		}
		rows[i].P50VsFloor = overRounds(rounds, func(r, base, _ round) float64 {
			return float64(percentile(r.alone, 0.50)) / float64(percentile(base.alone, 0.50))
		})
		rows[i].P99VsFloor = overRounds(rounds, func(r, base, _ round) float64 {
			return float64(percentile(r.alone, 0.99)) / float64(percentile(base.alone, 0.99))
		})
		rows[i].ReqPerSecVsFloor = overRounds(rounds, func(r, base, _ round) float64 { return r.reqPerSec() / base.reqPerSec() })
		if targets[i].kind == minting {
			rows[i].ExtraMs = overRounds(rounds, func(r, base, post round) float64 {
				return ms(percentile(r.alone, 0.50) - percentile(base.alone, 0.50) - percentile(post.alone, 0.50))
			})
		}
	}
	return rows
}

// median is the median of values, which it sorts.
func median(values []float64) float64 {
	slices.Sort(values)
	m := values[len(values)/2]
	if len(values)%2 == 0 {
		m = (values[len(values)/2-1] + m) / 2
	}
	return m
}

// percentile is the nearest-rank percentile of sorted latencies.
func percentile(sorted []time.Duration, p float64) time.Duration {
	return sorted[int(math.Ceil(p*float64(len(sorted))))-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
