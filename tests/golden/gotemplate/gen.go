// Writes golden.json: what Go's text/template renders for each case of cases.json.
//
//	cd tests/golden/gotemplate && go run gen.go
//
// Data is JSON with whole numbers as int and the rest as float64 (as Python's json reads them),
// so both sides see the same kinds. Each case gives its output, or its error.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

type testCase struct {
	Name     string          `json:"name"`
	Template string          `json:"template"`
	Data     json.RawMessage `json:"data"`
	Strict   bool            `json:"strict"`
	Left     string          `json:"left"`
	Right    string          `json:"right"`
}

type result struct {
	Name   string `json:"name"`
	Output string `json:"output"`
	Error  string `json:"error"`
}

func typed(v interface{}) interface{} {
	switch x := v.(type) {
	case json.Number:
		if i, err := x.Int64(); err == nil {
			return int(i)
		}
		f, _ := x.Float64()
		return f
	case map[string]interface{}:
		for k, e := range x {
			x[k] = typed(e)
		}
		return x
	case []interface{}:
		for i, e := range x {
			x[i] = typed(e)
		}
		return x
	}
	return v
}

// stub functions: the same in the Python test (a function with a fixed result, and errors)
var funcs = template.FuncMap{
	"upper": strings.ToUpper,
	"pair":  func(a, b interface{}) []interface{} { return []interface{}{a, b} },
	"fail":  func() (string, error) { return "", os.ErrNotExist },
	"words": func(s string) []interface{} {
		out := []interface{}{}
		for _, w := range strings.Fields(s) {
			out = append(out, w)
		}
		return out
	},
}

func main() {
	raw, err := os.ReadFile("cases.json")
	if err != nil {
		panic(err)
	}
	var cases []testCase
	if err := json.Unmarshal(raw, &cases); err != nil {
		panic(err)
	}
	results := []result{}
	for _, c := range cases {
		var data interface{}
		if len(c.Data) > 0 {
			dec := json.NewDecoder(bytes.NewReader(c.Data))
			dec.UseNumber()
			if err := dec.Decode(&data); err != nil {
				panic(err)
			}
			data = typed(data)
		}
		t := template.New(c.Name).Funcs(funcs)
		if c.Left != "" {
			t = t.Delims(c.Left, c.Right)
		}
		if c.Strict {
			t = t.Option("missingkey=error")
		}
		r := result{Name: c.Name}
		parsed, err := t.Parse(c.Template)
		if err != nil {
			r.Error = err.Error()
		} else {
			var out bytes.Buffer
			if err := parsed.Execute(&out, data); err != nil {
				r.Error = err.Error()
			}
			r.Output = out.String()
		}
		results = append(results, r)
	}
	out, _ := json.MarshalIndent(results, "", "  ")
	if err := os.WriteFile("golden.json", append(out, '\n'), 0o644); err != nil {
		panic(err)
	}
	// consul-template's timestamp formats time.Now().UTC() with a Go layout: these layouts, one moment
	moment := time.Date(2021, 3, 4, 17, 6, 7, 89000000, time.UTC)
	layouts := []string{
		"2006-01-02T15:04:05Z07:00", "2006-01-02", "Jan 2 15:04:05", "Monday, January _2 2006", "3:04PM",
		"03:04:05 pm -0700 MST", "06/1/2 15h", "2006-01-02 15:04:05.000", "15:04:05.000000 Z0700", "-07:00 text 5",
	}
	formatted := map[string]string{}
	for _, layout := range layouts {
		formatted[layout] = moment.Format(layout)
	}
	out, _ = json.MarshalIndent(formatted, "", "  ")
	if err := os.WriteFile("timestamps.json", append(out, '\n'), 0o644); err != nil {
		panic(err)
	}
}
