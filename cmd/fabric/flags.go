package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// flagSet is a flag.FlagSet that knows each flag's help section and, for
// `fabric serve`, its environment twin and config key.
type flagSet struct {
	*flag.FlagSet
	rows []flagRow // definition order
	env  bool      // the flags have FABRIC_* twins
}

type flagRow struct {
	group, name, key, usage string
	v                       value
}

func newFlagSet(name string, env bool) *flagSet {
	fs := &flagSet{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), env: env}
	fs.SetOutput(io.Discard)
	return fs
}

func (fs *flagSet) add(group, name, key, usage string, v value) {
	fs.Var(v, name, usage)
	fs.rows = append(fs.rows, flagRow{group, name, key, usage, v})
}

// serveFlags binds every setting to c.
func serveFlags(c *serveConfig) *flagSet {
	fs := newFlagSet("serve", true)
	for i := range settings {
		s := &settings[i]
		fs.add(s.group, s.flag, s.key, s.usage, s.bind(c))
	}
	return fs
}

// parseServe reads `fabric serve`'s arguments, then its environment, then
// its config file: a flag wins over its environment variable, which wins
// over the file's key, which wins over the default.
func parseServe(args []string) (*serveConfig, *flagSet, error) {
	c := newServeConfig()
	fs := serveFlags(c)
	if err := fs.Parse(args); err != nil {
		return nil, fs, usageError{err}
	}
	if fs.NArg() > 0 {
		return nil, fs, usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	if !onCommandLine["config"] {
		if v, ok := os.LookupEnv(envName("config")); ok {
			c.ConfigFile = v
		}
	}
	if c.ConfigFile != "" {
		data, err := os.ReadFile(c.ConfigFile)
		if err != nil {
			return nil, fs, fmt.Errorf("config: %w", err)
		}
		if err := applyConfig(c.ConfigFile, data, c, func(s *setting) bool { return onCommandLine[s.flag] }); err != nil {
			return nil, fs, err
		}
	}
	if err := fs.applyEnv(onCommandLine); err != nil {
		return nil, fs, err
	}
	return c, fs, nil
}

// applyEnv sets every flag not given on the command line from its
// environment twin.
func (fs *flagSet) applyEnv(skip map[string]bool) error {
	for _, r := range fs.rows {
		if skip[r.name] || r.name == "config" {
			continue
		}
		if v, ok := os.LookupEnv(envName(r.name)); ok {
			if err := r.v.Set(v); err != nil {
				return fmt.Errorf("%s=%q: %w", envName(r.name), v, err)
			}
		}
	}
	return nil
}

// usage writes header, then every flag by section with its type, default,
// environment twin and config key.
func (fs *flagSet) usage(w io.Writer, header string) {
	fmt.Fprintln(w, strings.TrimRight(header, "\n"))
	group := ""
	for _, r := range fs.rows {
		if r.group != group {
			group = r.group
			fmt.Fprintf(w, "\n%s:\n", group)
		}
		line := "  --" + r.name
		if t := r.v.Type(); t != "bool" {
			line += " " + t
		}
		fmt.Fprintf(w, "%-32s %s\n", line, r.usage)
		var notes []string
		if fs.env {
			notes = append(notes, "env "+envName(r.name))
		}
		if r.key != "" {
			notes = append(notes, "key "+r.key)
		}
		if r.name != "config" {
			def := fs.Lookup(r.name).DefValue
			if def == "" {
				def = `""`
			}
			notes = append(notes, "default "+def)
		}
		if len(notes) > 0 {
			fmt.Fprintf(w, "%-32s %s\n", "", strings.Join(notes, ", "))
		}
	}
}

// usageError is a mistake on the command line: the usage follows it.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

// isHelp reports whether err is the flag package's answer to -h or --help.
func isHelp(err error) bool { return errors.Is(err, flag.ErrHelp) }
