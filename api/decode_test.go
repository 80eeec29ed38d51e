package api

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzDecoder: the decoder accepts exactly the JSON that encoding/json
// accepts (less invalid UTF-8 and absurd nesting), returns values as they
// are in the input, and decodes strings as encoding/json does.
func FuzzDecoder(f *testing.F) {
	for _, s := range []string{
		`{"topic":"a","event":"b","data":{"x":[1,2.5e-3,true,false,null,"s\n\u00e9\ud83d\ude00"]}}`,
		`{}`, ` `, `[1,2]`, `"x"`, `-0.0E+1`, `{"a":}`, `{"a" 1}`, `"\ud800"`, `"\ud800\u0041"`,
		`"\ud83d\ude00"`, `01`, `1.`, `{"a":1,}`, `[1,]`, "\"\x01\"", "\"\xff\"", `"\x"`, `nul`,
		`{"topic":null,"persist":null}`, `{"since":18446744073709551615}`, `{"since":18446744073709551616}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		d := decoder{b: in}
		raw, err := d.raw()
		if err == nil && !d.end() {
			err = d.fail("trailing data")
		}
		valid := json.Valid(in)
		switch {
		case err == nil && !valid:
			t.Fatalf("accepted invalid JSON %q", in)
		case err != nil && valid && utf8.Valid(in) && !strings.Contains(err.Error(), "nested too deeply"):
			t.Fatalf("refused valid JSON %q: %v", in, err)
		case err != nil:
			return
		}
		if !bytes.Equal(raw, bytes.TrimSpace(in)) {
			t.Fatalf("raw value %q of %q", raw, in)
		}
		if raw[0] == '"' {
			var want string
			if err := json.Unmarshal(raw, &want); err != nil {
				t.Fatal(err)
			}
			d := decoder{b: raw}
			got, err := d.stringValue("s")
			if err != nil || got != want {
				t.Fatalf("string %q decoded as %q, %v; encoding/json: %q", raw, got, err, want)
			}
		}
		// As a publish body: the fields decoded are encoding/json's.
		if raw[0] == '{' {
			var m message
			d := decoder{b: in}
			if d.body(func(k []byte) error { return m.field(&d, k, nil) }) != nil {
				return // wrong types, say
			}
			var want struct {
				Topic, Event *string
				Data         json.RawMessage
				Persist      *bool
			}
			if err := json.Unmarshal(in, &want); err != nil {
				return
			}
			if hasFoldedKeys(in) {
				return // encoding/json matches names case-insensitively, this decoder exactly
			}
			if want.Topic != nil && *want.Topic != m.topic || want.Event != nil && *want.Event != m.event ||
				want.Persist != nil && *want.Persist != m.persist {
				t.Fatalf("%q: decoded %+v, encoding/json %+v", in, m, want)
			}
			if !bytes.Equal(bytes.TrimSpace(want.Data), m.data) && !(m.data == nil && string(want.Data) == "null") {
				t.Fatalf("%q: data %q, encoding/json %q", in, m.data, want.Data)
			}
		}
	})
}

// hasFoldedKeys reports top-level keys that equal a message field only
// case-insensitively.
func hasFoldedKeys(in []byte) bool {
	var m map[string]json.RawMessage
	if json.Unmarshal(in, &m) != nil {
		return true
	}
	for k := range m {
		for _, f := range []string{"topic", "event", "data", "persist"} {
			if k != f && strings.EqualFold(k, f) {
				return true
			}
		}
	}
	return false
}

func TestDecoderBounds(t *testing.T) {
	deep := strings.Repeat("[", maxDepth+2) + strings.Repeat("]", maxDepth+2)
	d := decoder{b: []byte(`{"data":` + deep + `}`)}
	var m message
	if err := d.body(func(k []byte) error { return m.field(&d, k, nil) }); err == nil || !strings.Contains(err.Error(), "nested too deeply") {
		t.Fatalf("deep nesting: %v", err)
	}
	for _, tc := range []struct{ in, want string }{
		{`{"since":1.5}`, "non-negative integer"},
		{`{"since":-1}`, "non-negative integer"},
		{`{"since":"1"}`, "invalid"},
		{`{"topic":1}`, "must be a string"},
		{`{"persist":"yes"}`, "must be a boolean"},
		{"{\"data\":\"\xff\"}", "UTF-8"},
		{`{"topic":"a"} x`, "after the JSON object"},
	} {
		d := decoder{b: []byte(tc.in)}
		var since uint64
		err := d.body(func(k []byte) error {
			if string(k) == "since" {
				var err error
				since, err = d.uintValue("since")
				return err
			}
			return m.field(&d, k, nil)
		})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v (since %d), want an error with %q", tc.in, err, since, tc.want)
		}
	}
}
