package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/signal"
	"strings"
	"syscall"

	"github.com/fabricrt/fabric/wsedge/wsclient"
)

const subHeader = `Usage: fabric sub [flags] topic...

Subscribes to the topics and prints every message as a JSON line. With
--since, persistent topics replay what was kept after that seq first.`

// subFlags binds sub's flags.
func subFlags(url *string, since, count *int) *flagSet {
	fs := newFlagSet("sub", false)
	*url, *since = "ws://localhost:8080/ws", -1
	fs.add("Flags", "url", "", "WebSocket endpoint", strValue{url})
	fs.add("Flags", "since", "", "resume persistent topics after this seq (-1: live only)", intValue{since})
	fs.add("Flags", "count", "", "exit after this many messages (0: run until interrupted)", intValue{count})
	return fs
}

func subUsage(w io.Writer) {
	var url string
	var since, count int
	subFlags(&url, &since, &count).usage(w, subHeader)
}

// subCmd subscribes to topics and prints every envelope as a JSON line.
func subCmd(args []string, stdout, stderr io.Writer) int {
	var url string
	var since, count int
	fs := subFlags(&url, &since, &count)
	if err := fs.Parse(args); err != nil || fs.NArg() == 0 {
		if isHelp(err) {
			fs.usage(stdout, subHeader)
			return 0
		}
		if err == nil {
			err = fmt.Errorf("no topic given")
		}
		fmt.Fprintf(stderr, "fabric sub: %v\n\n", err)
		fs.usage(stderr, subHeader)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	c, err := wsclient.Dial(ctx, url, wsclient.Options{Reconnect: true})
	if err != nil {
		fmt.Fprintln(stderr, "fabric sub:", err)
		return 1
	}
	defer c.Close()
	for _, t := range fs.Args() {
		if since >= 0 {
			err = c.SubscribeSince(ctx, t, uint64(since))
		} else {
			err = c.Subscribe(ctx, t)
		}
		if err != nil {
			fmt.Fprintln(stderr, "fabric sub:", err)
			return 1
		}
	}
	enc := json.NewEncoder(stdout)
	for n := 0; count <= 0 || n < count; {
		e, err := c.Next(ctx)
		if err != nil {
			return 0
		}
		if strings.HasPrefix(e.Topic, "__replay:") {
			continue // the end of a replay, not a message
		}
		_ = enc.Encode(e)
		n++
	}
	return 0
}
