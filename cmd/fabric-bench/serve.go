package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/fabricrt/fabric/api"

	"github.com/fabricrt/fabric/embed"
	"github.com/fabricrt/fabric/fabric"
	fjs "github.com/fabricrt/fabric/jetstream"
	"github.com/fabricrt/fabric/wsedge"
)

// inprocServer is the server under test run inside the tool (--serve): one
// instance, or two clustered by routes for cross-instance (subscribers on
// the second, publishes on the first).
type inprocServer struct {
	servers []*embed.Server
	subURL  string
	pubHTTP string
	pub     *fabric.Node
	closers []func()
}

type instance struct {
	node *fabric.Node
	http string
}

func startInproc(ctx context.Context, cross, perConn bool) (*inprocServer, error) {
	s := &inprocServer{}
	n := 1
	if cross {
		n = 2
	}
	cluster := make([]string, n)
	var routes []string
	for i := range cluster {
		cluster[i] = freeAddr()
		routes = append(routes, "nats://"+cluster[i])
	}
	var insts []instance
	for i := range n {
		eo := embed.Options{Name: fmt.Sprintf("bench-%d", i)}
		if cross {
			eo.ClusterListen, eo.Routes = cluster[i], routes
		}
		in, err := s.startOne(ctx, eo, perConn)
		if err != nil {
			s.close()
			return nil, err
		}
		insts = append(insts, in)
	}
	if cross { // wait for the route before publishing across it
		if err := s.waitRoutes(30 * time.Second); err != nil {
			s.close()
			return nil, err
		}
	}
	s.pub = insts[0].node
	s.pubHTTP = insts[0].http
	s.subURL = "ws" + insts[n-1].http[len("http"):] + "/ws"
	return s, nil
}

func (s *inprocServer) startOne(ctx context.Context, eo embed.Options, perConn bool) (instance, error) {
	dir, err := os.MkdirTemp("", "fabric-bench-data")
	if err != nil {
		return instance{}, err
	}
	s.closers = append(s.closers, func() { os.RemoveAll(dir) })
	eo.DataDir = dir
	ns, err := embed.Start(ctx, eo)
	if err != nil {
		return instance{}, err
	}
	s.closers = append(s.closers, ns.Shutdown)
	s.servers = append(s.servers, ns)
	nc, err := ns.Connect()
	if err != nil {
		return instance{}, err
	}
	s.closers = append(s.closers, nc.Close)
	br := fjs.NewBroker(nc, fjs.BrokerOptions{})
	node, err := fabric.NewNode(fabric.Config{Broker: br, Limits: fabric.Limits{RPCRate: -1, FrameRate: -1, ByteRate: -1}, Hooks: fabric.Hooks{Publish: func(_ *fabric.Client, topic, _ string) error {
		if strings.HasPrefix(topic, "bench:") {
			return nil
		}
		return fabric.NewLiveError(fabric.CodeForbidden, "bench: topics only")
	}}})
	if err != nil {
		return instance{}, err
	}
	s.closers = append(s.closers, func() { node.Close(); br.Close() })
	edge, err := wsedge.New(node, wsedge.Options{GoroutinePerConn: perConn})
	if err != nil {
		return instance{}, err
	}
	s.closers = append(s.closers, func() { edge.Close() })
	mux := http.NewServeMux()
	mux.Handle("/ws", edge)
	mux.Handle("/api/", api.New(api.Options{Node: node}))
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return instance{}, err
	}
	hs := &http.Server{Handler: mux}
	go func() { _ = hs.Serve(ln) }()
	s.closers = append(s.closers, func() { hs.Close() })
	return instance{node: node, http: "http://" + ln.Addr().String()}, nil
}

func (s *inprocServer) waitRoutes(d time.Duration) error {
	deadline := time.Now().Add(d)
	for _, ns := range s.servers {
		for ns.NATS().NumRoutes() == 0 {
			if time.Now().After(deadline) {
				return fmt.Errorf("instances did not route to each other within %s", d)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

func (s *inprocServer) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:0"
	}
	defer l.Close()
	return l.Addr().String()
}
