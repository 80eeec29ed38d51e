package jetstream_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/jetstream"
	natsjs "github.com/nats-io/nats.go/jetstream"
)

// Presence and a rate limit on an embedded NATS server: two tabs of one
// user are one member; the fourth call in the interval is refused.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir, _ := os.MkdirTemp("", "fabric-example")
	defer os.RemoveAll(dir)

	ns, err := embed.Start(ctx, embed.Options{DataDir: dir})
	if err != nil {
		panic(err)
	}
	defer ns.Shutdown()
	nc, _ := ns.Connect()
	defer nc.Close()
	js, _ := natsjs.New(nc)
	broker := jetstream.NewBroker(nc, jetstream.BrokerOptions{})
	defer broker.Close()
	node, _ := fabric.NewNode(fabric.Config{Broker: broker})
	defer node.Close()

	store, err := jetstream.NewPresenceStore(ctx, js, jetstream.PresenceStoreOptions{})
	if err != nil {
		panic(err)
	}
	defer store.Close()
	presence, err := fabric.NewPresence(ctx, node, store, fabric.PresenceOptions{
		Topics: fabric.MatchTopics([]string{"room:*"}), // subscribers of room:* join
		Select: func(userData any) any { return map[string]any{"name": userData} },
	})
	if err != nil {
		panic(err)
	}
	defer presence.Close()

	// Connections normally come from the WebSocket edge; here two tabs of
	// "alice" subscribe directly.
	for range 2 {
		tab := node.Connect(discard{}, "alice", "127.0.0.1:1")
		if err := presence.Join(ctx, "room:1", tab); err != nil {
			panic(err)
		}
	}
	members, _ := presence.List(ctx, "room:1")
	fmt.Println(len(members), members[0].Key, string(members[0].Data))

	limiter, err := jetstream.NewRateLimiter(ctx, js, jetstream.RateLimitOptions{Points: 3, Interval: time.Minute})
	if err != nil {
		panic(err)
	}
	defer limiter.Close()
	for range 4 {
		allowed, remaining, _, _ := limiter.Consume(ctx, "user:alice", 1)
		fmt.Println(allowed, remaining)
	}
	// Output:
	// 1 alice {"name":"alice"}
	// true 2
	// true 1
	// true 0
	// false 0
}

type discard struct{}

func (discard) Deliver(*fabric.Message) bool { return true }
func (discard) Close(int, string)            {}
