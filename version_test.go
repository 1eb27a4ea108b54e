package evenergy

import (
	"cmp"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// versionPattern is a release, MAJOR.MINOR.PATCH, or a build between releases, MAJOR.MINOR.PATCH-dev.
var versionPattern = regexp.MustCompile(`^(\d+)\.(\d+)\.(\d+)(-dev)?$`)

// releaseVersion is the VERSION file: the one place the version is written.
func releaseVersion(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile("VERSION")
	if err != nil {
		t.Fatal(err)
	}
	version := strings.TrimSpace(string(raw))
	if !versionPattern.MatchString(version) {
		t.Fatalf("VERSION holds %q; want MAJOR.MINOR.PATCH for a release, e.g. 0.3.0, or MAJOR.MINOR.PATCH-dev between releases, e.g. 0.4.0-dev", version)
	}
	return version
}

// isDevVersion reports whether version is a build between releases.
func isDevVersion(version string) bool { return strings.HasSuffix(version, "-dev") }

// recordedSums is where a release's SHA256SUMS, as `make release` wrote it, is kept in the repository.
func recordedSums(version string) string { return filepath.Join("release", "v"+version, "SHA256SUMS") }

// TestVersionIsReleasedOrNewer checks that no two different builds carry one version: VERSION is
// either the newest dated release in CHANGELOG.md, whose SHA256SUMS is recorded in the repository,
// or a -dev version newer than every release, which no release ever carries.
func TestVersionIsReleasedOrNewer(t *testing.T) {
	version := releaseVersion(t)
	releases := changelogReleases(t)
	if isDevVersion(version) {
		base := strings.TrimSuffix(version, "-dev")
		for _, r := range releases {
			if compareVersions(base, r) <= 0 {
				t.Fatalf("VERSION holds %s, but CHANGELOG.md has released %s: between releases VERSION must be a -dev version newer than every release", version, r)
			}
		}
		return
	}
	if len(releases) == 0 || releases[0] != version {
		t.Fatalf("VERSION holds the release %s, but the newest dated release in CHANGELOG.md is %v: change both together, or write %s-dev", version, releases, version)
	}
	if _, err := os.Stat(recordedSums(version)); err != nil {
		t.Fatalf("VERSION holds the release %s, but its SHA256SUMS is not recorded: copy dist/SHA256SUMS of `make release` to %s (%v)", version, recordedSums(version), err)
	}
}

// changelogReleases are the versions of CHANGELOG.md's dated release headings, the newest first;
// the changelog must open with its Unreleased section.
func changelogReleases(t *testing.T) []string {
	t.Helper()
	changelog, err := os.ReadFile("CHANGELOG.md")
	if err != nil {
		t.Fatal(err)
	}
	headings := regexp.MustCompile(`(?m)^## \[([^\]]+)\](.*)$`).FindAllStringSubmatch(string(changelog), -1)
	if len(headings) == 0 || headings[0][1] != "Unreleased" {
		t.Fatalf("CHANGELOG.md must open with ## [Unreleased], then the releases; its headings are %v", headings)
	}
	var releases []string
	for _, h := range headings[1:] {
		if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(h[1]) || !regexp.MustCompile(`^ - \d{4}-\d{2}-\d{2}$`).MatchString(h[2]) {
			t.Fatalf("CHANGELOG.md heading %q: want ## [MAJOR.MINOR.PATCH] - YYYY-MM-DD", h[0])
		}
		if len(releases) > 0 && compareVersions(h[1], releases[len(releases)-1]) >= 0 {
			t.Fatalf("CHANGELOG.md lists %s below %s: the newest release comes first", h[1], releases[len(releases)-1])
		}
		releases = append(releases, h[1])
	}
	return releases
}

// compareVersions compares two MAJOR.MINOR.PATCH versions as cmp.Compare does.
func compareVersions(a, b string) int {
	pa, pb := versionPattern.FindStringSubmatch(a), versionPattern.FindStringSubmatch(b)
	for i := 1; i <= 3; i++ {
		na, _ := strconv.Atoi(pa[i])
		nb, _ := strconv.Atoi(pb[i])
		if c := cmp.Compare(na, nb); c != 0 {
			return c
		}
	}
	return 0
}

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{{"0.3.0", "0.2.0", 1}, {"0.2.0", "0.10.0", -1}, {"1.0.0", "0.99.99", 1}, {"0.2.1", "0.2.1", 0}} {
		if got := compareVersions(c.a, c.b); got != c.want {
			t.Errorf("compareVersions(%s, %s) = %d, want %d", c.a, c.b, got, c.want)
		}
	}
}

// TestMakeBuildStampsTheVersion checks that `make build` stamps the VERSION file's version.
func TestMakeBuildStampsTheVersion(t *testing.T) {
	version := releaseVersion(t)
	out, err := exec.Command("make", "--dry-run", "build").CombinedOutput()
	if err != nil {
		t.Fatalf("make --dry-run build: %v\n%s", err, out)
	}
	if want := "-X " + versionVar + "=v" + version; !strings.Contains(string(out), want) {
		t.Fatalf("make build does not stamp %q:\n%s", want, out)
	}
}
