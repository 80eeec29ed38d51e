package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/signal"
	"syscall"

	"github.com/fabricrt/fabric/wsedge/wsclient"
)

// subCmd subscribes to topics and prints every envelope as a JSON line:
//
//	fabric sub [--url ws://localhost:8080/ws] [--since N] topic...
func subCmd(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("sub")
	fs.section("Subscribe")
	var url string
	var since int
	fs.str(&url, "url", "ws://localhost:8080/ws", "WebSocket endpoint")
	fs.integer(&since, "since", -1, "resume persistent topics after this sequence (-1: live only)")
	if err := fs.Parse(args); err != nil || fs.NArg() == 0 {
		fmt.Fprintln(stderr, "usage: fabric sub [--url ws://host:port/ws] [--since N] topic...")
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
	for {
		e, err := c.Next(ctx)
		if err != nil {
			return 0
		}
		_ = enc.Encode(e)
	}
}
