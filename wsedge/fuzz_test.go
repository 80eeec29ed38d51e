package wsedge

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsflate"
)

func maskedFrame(op ws.OpCode, fin bool, p string) []byte {
	var b bytes.Buffer
	_ = ws.WriteFrame(&b, ws.MaskFrame(ws.NewFrame(op, fin, []byte(p))))
	return b.Bytes()
}

// FuzzFrames feeds arbitrary bytes to a connection's frame parser and
// protocol dispatcher: nothing may panic, and the connection never holds
// more than one maximal frame of unparsed input.
func FuzzFrames(f *testing.F) {
	seeds := [][]byte{
		maskedFrame(ws.OpText, true, `{"type":"subscribe","topic":"a","ref":1}`),
		maskedFrame(ws.OpText, true, `{"type":"unsubscribe","topic":"a"}`),
		maskedFrame(ws.OpText, true, `{"type":"replay","topic":"a","since":3}`),
		maskedFrame(ws.OpText, true, `{"rpc":"a/b","id":"1","args":[1,{"x":[]}]}`),
		maskedFrame(ws.OpText, true, `{"batch":[{"rpc":"a/b","id":"1"},{"id":"2"},7]}`),
		maskedFrame(ws.OpText, true, `{"type":"subscribe","topic":"\u0000"}`),
		maskedFrame(ws.OpBinary, true, "\x00\x00\x05hello"),
		append(maskedFrame(ws.OpText, false, `{"type":`), maskedFrame(ws.OpContinuation, true, `"subscribe","topic":"z"}`)...),
		maskedFrame(ws.OpPing, true, "ping"),
		maskedFrame(ws.OpClose, true, "\x03\xe8bye"),
		maskedFrame(ws.OpClose, true, "\x03"),
		{0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0},
		{0x81, 0xfe, 0x40, 0x00, 1, 2, 3, 4},
		{0x81, 0x05, 'h', 'e', 'l', 'l', 'o'},
		{0xc1, 0x80, 0, 0, 0, 0},
		{0x81, 0x85, 1, 2, 3}, // header cut inside the mask key (was a crash)
	}
	if z, err := wsflate.CompressFrame(ws.NewTextFrame([]byte(`{"type":"subscribe","topic":"zz"}`))); err == nil {
		var b bytes.Buffer
		_ = ws.WriteFrame(&b, ws.MaskFrame(z))
		seeds = append(seeds, b.Bytes())
	}
	for _, s := range seeds {
		f.Add(s, false)
		f.Add(s, true)
	}
	e := fuzzEdge(f)
	f.Fuzz(func(t *testing.T, data []byte, deflate bool) {
		a, b := net.Pipe()
		go func() { _, _ = io.Copy(io.Discard, b) }()
		c := e.attach(a, nil, "fuzz", deflate, nil)
		c.rmu.Lock()
		// Feed in two pieces to exercise partial frames.
		half := len(data) / 2
		c.feed(data[:half])
		c.feed(data[half:])
		held := len(c.in)
		c.rmu.Unlock()
		c.terminate(1006, "fuzz done")
		b.Close()
		if held > e.opts.MaxPayloadLength+14 {
			t.Fatalf("connection holds %d unparsed bytes", held)
		}
	})
}

func fuzzEdge(f *testing.F) *Edge {
	ns, err := embed.Start(context.Background(), embed.Options{DataDir: f.TempDir()})
	if err != nil {
		f.Fatal(err)
	}
	nc, err := ns.Connect()
	if err != nil {
		f.Fatal(err)
	}
	br := fjs.NewBroker(nc, fjs.BrokerOptions{Prefix: "fuzz"})
	node, err := fabric.NewNode(fabric.Config{Broker: br, Hooks: fabric.Hooks{Message: func(*fabric.Client, []byte, bool) {}}})
	if err != nil {
		f.Fatal(err)
	}
	node.HandleRPC("a/b", func(context.Context, *fabric.Call) (any, error) { return 1, nil })
	e, err := New(node, Options{GoroutinePerConn: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { e.Close(); node.Close(); br.Close(); nc.Close(); ns.Shutdown() })
	return e
}
