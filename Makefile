# Fabric's test command: `make test` (what .ci/run and the README use).
#
# Everything the tests need is started by the tests themselves (embedded and
# standalone NATS servers on free loopback ports). Services the machine
# already runs (NATS on 127.0.0.1:4222) are used in addition when present;
# under CI=true their absence is a failure, never a silent skip.

GO       ?= go
TIMEOUT  ?= 40m
PKGS     ?= ./...

.PHONY: test vet build bench fuzz

test: vet
	$(GO) test -race -count=1 -timeout $(TIMEOUT) $(PKGS)

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet $(PKGS)

build:
	$(GO) build -o bin/fabric ./cmd/fabric

# Benchmarks report figures; they are not part of `make test`.
bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

# A short coverage-guided run of every fuzz target (the seed corpora run in `make test`).
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzSubjectToken -fuzztime 30s ./jetstream/
	$(GO) test -run '^$$' -fuzz FuzzKVToken -fuzztime 30s ./jetstream/
	$(GO) test -run '^$$' -fuzz FuzzValidateTopic -fuzztime 30s ./fabric/
	$(GO) test -run '^$$' -fuzz FuzzAppendJSONString -fuzztime 30s ./fabric/
	$(GO) test -run '^$$' -fuzz FuzzFrames -fuzztime 30s ./wsedge/
	$(GO) test -run '^$$' -fuzz FuzzDecoder -fuzztime 30s ./api/
	$(GO) test -run '^$$' -fuzz FuzzConfigFile -fuzztime 30s ./cmd/fabric/
	$(GO) test -run '^$$' -fuzz FuzzVerify -fuzztime 30s ./auth/

# The long versions of the cluster tests (the issue's sizes): a kill -9 of
# one of three instances while 1,000 clients receive 1,000 messages/s on
# persistent topics, a rolling restart at 1,000 messages/s, the worker
# supervisor and the supercluster, against a server built without the race
# detector (FABRIC_CHAOS_RACE=1 keeps it). `make test` runs the short ones.
.PHONY: chaos
chaos:
	FABRIC_CHAOS=1 $(GO) test -count=1 -timeout 30m -v -run 'TestFailoverKill9|TestRollingRestart|TestWorkers|TestSupercluster' ./cmd/fabric
