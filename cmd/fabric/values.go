package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// value is a flag.Value bound to one field, with a type name for the help.
type value interface {
	String() string
	Set(string) error
	Type() string
}

// listSetter is a value that also takes a YAML sequence.
type listSetter interface {
	SetList([]string) error
}

type strValue struct{ p *string }

func (v strValue) String() string     { return *v.p }
func (v strValue) Set(s string) error { *v.p = s; return nil }
func (v strValue) Type() string       { return "string" }

type intValue struct{ p *int }

func (v intValue) String() string { return strconv.Itoa(*v.p) }
func (v intValue) Type() string   { return "int" }
func (v intValue) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("%q is not an integer", s)
	}
	*v.p = n
	return nil
}

type floatValue struct{ p *float64 }

func (v floatValue) String() string { return strconv.FormatFloat(*v.p, 'g', -1, 64) }
func (v floatValue) Type() string   { return "float" }
func (v floatValue) Set(s string) error {
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil {
		return fmt.Errorf("%q is not a number", s)
	}
	*v.p = f
	return nil
}

type int64Value struct{ p *int64 }

func (v int64Value) String() string { return strconv.FormatInt(*v.p, 10) }
func (v int64Value) Type() string   { return "int" }
func (v int64Value) Set(s string) error {
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return fmt.Errorf("%q is not an integer", s)
	}
	*v.p = n
	return nil
}

type boolValue struct{ p *bool }

func (v boolValue) String() string   { return strconv.FormatBool(*v.p) }
func (v boolValue) Type() string     { return "bool" }
func (v boolValue) IsBoolFlag() bool { return true }
func (v boolValue) Set(s string) error {
	b, err := strconv.ParseBool(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("%q is not true or false", s)
	}
	*v.p = b
	return nil
}

type durValue struct{ p *time.Duration }

func (v durValue) String() string { return v.p.String() }
func (v durValue) Type() string   { return "duration" }
func (v durValue) Set(s string) error {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("%q is not a duration such as 30s or 24h", s)
	}
	*v.p = d
	return nil
}

// listValue is a comma-separated list on the command line and in the
// environment, a list or a comma-separated string in the config file.
type listValue struct{ p *[]string }

func (v listValue) String() string { return strings.Join(*v.p, ",") }
func (v listValue) Type() string   { return "list" }
func (v listValue) Set(s string) error {
	return v.SetList(strings.Split(s, ","))
}

func (v listValue) SetList(items []string) error {
	var out []string
	for _, it := range items {
		if it = strings.TrimSpace(it); it != "" {
			out = append(out, it)
		}
	}
	*v.p = out
	return nil
}

// rateValue is POINTS/INTERVAL ("30/10s"; "30/10000" is in milliseconds,
// the seed's unit; empty: off).
type rateValue struct {
	points   *int
	interval *time.Duration
}

func (v rateValue) Type() string { return "rate" }
func (v rateValue) String() string {
	if *v.points <= 0 {
		return ""
	}
	return strconv.Itoa(*v.points) + "/" + v.interval.String()
}

func (v rateValue) Set(s string) error {
	if strings.TrimSpace(s) == "" {
		*v.points, *v.interval = 0, 0
		return nil
	}
	p, iv, err := parseRate(s)
	if err != nil {
		return err
	}
	*v.points, *v.interval = p, iv
	return nil
}

// parseRate reads POINTS/INTERVAL: "30/10s", "100/1m", or "30/10000" with
// the interval in milliseconds.
func parseRate(s string) (int, time.Duration, error) {
	p, iv, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return 0, 0, fmt.Errorf("rate %q: want POINTS/INTERVAL, e.g. 30/10s", s)
	}
	points, err := strconv.Atoi(strings.TrimSpace(p))
	if err != nil || points <= 0 {
		return 0, 0, fmt.Errorf("rate %q: points must be a positive integer", s)
	}
	iv = strings.TrimSpace(iv)
	d, err := time.ParseDuration(iv)
	if err != nil {
		ms, merr := strconv.Atoi(iv)
		if merr != nil {
			return 0, 0, fmt.Errorf("rate %q: interval must be a duration such as 10s", s)
		}
		d = time.Duration(ms) * time.Millisecond
	}
	if d <= 0 {
		return 0, 0, fmt.Errorf("rate %q: interval must be positive", s)
	}
	return points, d, nil
}
