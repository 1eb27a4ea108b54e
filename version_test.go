package evenergy

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// releaseVersion is the VERSION file: the one place the version is written.
func releaseVersion(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile("VERSION")
	if err != nil {
		t.Fatal(err)
	}
	version := strings.TrimSpace(string(raw))
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(version) {
		t.Fatalf("VERSION holds %q; want MAJOR.MINOR.PATCH, e.g. 0.2.0", version)
	}
	return version
}

// TestChangelogNamesTheVersion checks that CHANGELOG.md opens with an Unreleased section and that
// its newest release is the version in VERSION.
func TestChangelogNamesTheVersion(t *testing.T) {
	version := releaseVersion(t)
	changelog, err := os.ReadFile("CHANGELOG.md")
	if err != nil {
		t.Fatal(err)
	}
	headings := regexp.MustCompile(`(?m)^## \[([^\]]+)\]`).FindAllStringSubmatch(string(changelog), 2)
	if len(headings) < 2 || headings[0][1] != "Unreleased" {
		t.Fatalf("CHANGELOG.md must open with ## [Unreleased], then the releases; its headings start %v", headings)
	}
	if headings[1][1] != version {
		t.Fatalf("the newest release in CHANGELOG.md is %s, but VERSION holds %s: change both together", headings[1][1], version)
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
