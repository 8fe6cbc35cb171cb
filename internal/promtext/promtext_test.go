package promtext

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	got, err := Parse(strings.NewReader("# HELP x y\n# TYPE x counter\nx{a=\"b c\"} 3\n\ny 1.5e3\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[`x{a="b c"}`] != 3 || got["y"] != 1500 {
		t.Errorf("got %v", got)
	}
	for _, bad := range []string{"novalue\n", "x notanumber\n"} {
		if _, err := Parse(strings.NewReader(bad)); err == nil {
			t.Errorf("Parse(%q): no error", bad)
		}
	}
}
