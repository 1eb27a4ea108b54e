package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// machine is where and when the figures were measured.
type machine struct {
	Date   time.Time `json:"date"`
	CPUs   int       `json:"cpus"`
	Model  string    `json:"cpu_model"`
	Commit string    `json:"commit"`
	Go     string    `json:"go"`
}

func describeMachine() (machine, error) {
	m := machine{Date: time.Now().UTC().Truncate(time.Second), CPUs: runtime.NumCPU(), Go: runtime.Version(), Model: "unknown"}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		defer f.Close()
		for lines := bufio.NewScanner(f); lines.Scan(); {
			if name, value, _ := strings.Cut(lines.Text(), ":"); strings.TrimSpace(name) == "model name" {
				m.Model = strings.TrimSpace(value)
				break
			}
		}
	}
	commit, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return m, fmt.Errorf("git rev-parse: %w", err)
	}
	m.Commit = strings.TrimSpace(string(commit))
	// The generated file itself does not count: it changes with every run.
	changes, err := exec.Command("git", "status", "--porcelain", "--", ".", ":!docs/benchmarks.md").Output()
	if err != nil {
		return m, fmt.Errorf("git status: %w", err)
	}
	if len(changes) > 0 {
		m.Commit += " with uncommitted changes"
	}
	return m, nil
}

func (m machine) String() string {
	return fmt.Sprintf("%s, commit %s; %d CPUs (%s), %s", m.Date.Format("2006-01-02 15:04 MST"), m.Commit, m.CPUs, m.Model, m.Go)
}

// tableMarkdown is the table report as Markdown, one table per Vault.
func tableMarkdown(r report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Measured %s. %d interleaved rounds; per path and Vault %d requests by 1 client and %d by %d concurrent clients. "+
		"Ratios to the floor are medians of the ratios in each round.\n",
		r.Machine, r.Rounds, r.ReadsAlone, r.ReadsBurst, r.Clients)
	for _, t := range r.Tables {
		title := "Dev server, in-memory storage"
		if t.Storage == "raft" {
			title = "Single-node Raft, data on " + t.FileSystem
		}
		fmt.Fprintf(&b, "\n#### %s (Vault %s)\n\n", title, t.VaultVersion)
		fmt.Fprintf(&b, "| request | p50, 1 client | p99, 1 client | req/s, %d clients | p50 / floor | p99 / floor | req/s / floor | p50 = floor + POST + X |\n", r.Clients)
		fmt.Fprintln(&b, "|---|---:|---:|---:|---:|---:|---:|---:|")
		for _, row := range t.Rows {
			fmt.Fprintf(&b, "| %s `%s` | %.2f ms | %.2f ms | %.0f | %s | %s | %s | %s |\n", row.Name, row.Path, row.P50Ms, row.P99Ms, row.ReqPerSec,
				optional("%.2f", row.P50VsFloor), optional("%.2f", row.P99VsFloor), optional("%.2f", row.ReqPerSecVsFloor), optional("X = %.2f ms", row.ExtraMs))
		}
	}
	return b.String()
}

// optional formats f, or nothing for a row it does not apply to.
func optional(format string, f *float64) string {
	if f == nil {
		return ""
	}
	return fmt.Sprintf(format, *f)
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// writeSection replaces what lies between the begin and end markers of the named section of the
// Markdown file with text; the rest of the file is written by hand.
func writeSection(path, name, text string) error {
	doc, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	begin := fmt.Sprintf("<!-- begin %s: written by the bench, do not edit -->\n", name)
	end := fmt.Sprintf("<!-- end %s -->", name)
	before, rest, found := strings.Cut(string(doc), begin)
	_, after, foundEnd := strings.Cut(rest, end)
	if !found || !foundEnd {
		return fmt.Errorf("%s has no section %q: it needs the lines %q and %q", path, name, strings.TrimSpace(begin), end)
	}
	return os.WriteFile(path, []byte(before+begin+text+end+after), 0o644)
}
