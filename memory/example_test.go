package memory_test

import (
	"context"
	"fmt"

	"github.com/fabricrt/fabric/fabric"
	"github.com/fabricrt/fabric/memory"
)

// A Node on the memory backend: a plain publish, then one kept in the
// topic's history (it carries its sequence).
func Example() {
	backend := memory.New(memory.Options{})
	defer backend.Close()
	node, _ := fabric.NewNode(fabric.Config{Broker: backend.Broker(), History: backend.History()})
	defer node.Close()

	c := node.Connect(printer{}, "alice", "127.0.0.1:1") // the WebSocket edge does this
	_ = node.Subscribe(c, "chat")
	ctx := context.Background()
	_, _ = node.Publish(ctx, "chat", "msg", "hello")
	seq, _ := node.Publish(ctx, "chat", "msg", "kept", fabric.Persist())
	fmt.Println("seq", seq)
	// Output:
	// {"topic":"chat","event":"msg","data":"hello"}
	// {"topic":"chat","event":"msg","data":"kept","seq":1}
	// seq 1
}

// printer prints what the node delivers.
type printer struct{}

func (printer) Deliver(m *fabric.Message) bool { fmt.Println(string(m.Payload)); return true }
func (printer) Close(int, string)              {}
