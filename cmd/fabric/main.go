// Command fabric is the Fabric realtime server.
//
//	fabric serve     run the server (embedded NATS + JetStream by default)
//	fabric sub       subscribe to topics and print messages as JSON lines
//	fabric version   print the version
//	fabric help      print the usage of fabric or of a command
//
// Every flag of `fabric serve` has an environment twin (FABRIC_*) and a
// config file key (--config); see `fabric serve --help` and docs/config.md.
// The server itself is package server; this command only reads its
// options.
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// command is one `fabric` subcommand.
type command struct {
	name, summary string
	run           func(args []string, stdout, stderr io.Writer) int
	usage         func(w io.Writer)
}

func commands() []command {
	return []command{
		{"serve", "run the server (embedded NATS + JetStream by default)", serveCmd, serveUsage},
		{"sub", "subscribe to topics and print every message as a JSON line", subCmd, subUsage},
		{"version", "print the version", versionCmd, versionUsage},
		{"help", "print the usage of fabric or of a command", helpCmd, helpUsage},
	}
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "--help", "-help", "-h":
		usage(stdout)
		return 0
	case "--version", "-v":
		return versionCmd(nil, stdout, stderr)
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "fabric: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprint(w, "Fabric: a NATS-native realtime server.\n\nUsage:\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "  fabric %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, "\nfabric <command> --help prints a command's flags.\n")
}

// wantsHelp reports whether args ask for help (-h, -help, --help).
func wantsHelp(args []string) bool {
	for _, a := range args {
		switch a {
		case "-h", "-help", "--help":
			return true
		case "--":
			return false
		}
	}
	return false
}

func helpCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || wantsHelp(args) {
		usage(stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			c.usage(stdout)
			return 0
		}
	}
	fmt.Fprintf(stderr, "fabric help: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func helpUsage(w io.Writer) {
	fmt.Fprint(w, "Usage: fabric help [command]\n\nPrints the usage of fabric, or of one command (serve, sub, version, help).\n")
}

func versionCmd(args []string, stdout, stderr io.Writer) int {
	if wantsHelp(args) {
		versionUsage(stdout)
		return 0
	}
	if len(args) > 0 {
		fmt.Fprintf(stderr, "fabric version: unexpected argument %q\n\n", args[0])
		versionUsage(stderr)
		return 2
	}
	fmt.Fprintln(stdout, "fabric", versionString())
	return 0
}

func versionUsage(w io.Writer) {
	fmt.Fprint(w, "Usage: fabric version\n\nPrints the version of this binary.\n")
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
