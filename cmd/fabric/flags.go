package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// flagSet is a flag.FlagSet in which every flag has an environment twin:
// --foo-bar is also FABRIC_FOO_BAR. The command line wins over the
// environment, which wins over the default.
type flagSet struct {
	*flag.FlagSet
	members map[string][]string // help group → flag names, in definition order
	order   []string            // group order
	group   string
}

func newFlagSet(name string) *flagSet {
	fs := &flagSet{FlagSet: flag.NewFlagSet(name, flag.ContinueOnError), members: map[string][]string{}}
	fs.SetOutput(io.Discard)
	return fs
}

func envName(flagName string) string {
	return "FABRIC_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// section starts a help group for the flags defined after it.
func (fs *flagSet) section(title string) {
	fs.group = title
	fs.order = append(fs.order, title)
}

func (fs *flagSet) note(name string) { fs.members[fs.group] = append(fs.members[fs.group], name) }

func (fs *flagSet) str(p *string, name, def, usage string) {
	fs.StringVar(p, name, def, usage)
	fs.note(name)
}

func (fs *flagSet) integer(p *int, name string, def int, usage string) {
	fs.IntVar(p, name, def, usage)
	fs.note(name)
}

func (fs *flagSet) boolean(p *bool, name string, def bool, usage string) {
	fs.BoolVar(p, name, def, usage)
	fs.note(name)
}

func (fs *flagSet) duration(p *time.Duration, name string, def time.Duration, usage string) {
	fs.DurationVar(p, name, def, usage)
	fs.note(name)
}

// parse reads args, then fills unset flags from the environment.
func (fs *flagSet) parse(args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("%s=%q: %v", envName(f.Name), v, e)
			}
		}
	})
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return err
}

// usage writes every flag with its environment twin and default, by group.
func (fs *flagSet) usage(w io.Writer, header string) {
	fmt.Fprintln(w, header)
	for _, g := range fs.order {
		fmt.Fprintf(w, "\n%s:\n", g)
		for _, n := range fs.members[g] {
			f := fs.Lookup(n)
			name, _ := flag.UnquoteUsage(f)
			line := "  --" + f.Name
			if name != "" {
				line += " " + name
			}
			fmt.Fprintf(w, "%-34s %s\n", line, f.Usage)
			def := f.DefValue
			if def == "" {
				def = `""`
			}
			fmt.Fprintf(w, "%-34s env %s, default %s\n", "", envName(f.Name), def)
		}
	}
}
