// Package workers runs a server as one primary process and N worker
// processes (`fabric serve --workers N`, the seed's cluster mode).
//
// The primary owns what must outlive any one worker: the embedded NATS
// server (the workers connect to it over loopback) and the listening
// sockets. For each worker slot it binds one socket on the HTTP port with
// SO_REUSEPORT, so the kernel spreads new connections over the slots as it
// would over processes that each bound the port; the slot's worker inherits
// the socket (file descriptor 4 and up) and accepts on it. A socket belongs
// to the slot, not to the process: a worker that dies leaves its socket
// open in the primary, connections the kernel queued on it wait for the
// restarted worker instead of being reset, and a rolling restart starts the
// new worker on the same socket before the old one stops accepting, so no
// connection attempt fails. A worker started while others serve (a roll's
// replacement, a restart) is gated (Init.Gated): its listeners accept only
// once it calls StartAccepting, when it is ready. A worker that stops calls
// StopAccepting first, so that it refuses nothing the kernel gave it.
//
// A worker talks to its primary over a socket pair (file descriptor 3):
// newline-delimited JSON, an init message first (the NATS URL and token,
// how many listeners it inherits), then pings that the worker answers with
// its state (see Health). The supervisor
//
//   - pings every worker every HealthInterval (10s; every 250ms until it is
//     ready) and terminates (SIGKILL) one that leaves a ping unanswered for
//     HealthTimeout (30s), a stopped (SIGSTOP) or wedged process included;
//   - restarts a worker that exits or is terminated after a backoff that
//     doubles from MinBackoff (100ms) to MaxBackoff (5s); a worker that has
//     served for StableAfter resets its slot's backoff; after MaxRestarts
//     (50) restarts of one slot without such a stable run, Run gives up and
//     returns an error (the primary exits);
//   - on Roll (SIGHUP in fabric serve) replaces the workers one at a time:
//     a new worker on the slot's socket, ready, then SIGTERM to the old one,
//     which drains (WebSockets closed with 1001);
//   - on Shutdown (SIGTERM, SIGINT) stops restarting, closes its copies of
//     the sockets (the port stops accepting once the workers close theirs),
//     sends SIGTERM to every worker and waits StopTimeout for them to drain
//     before SIGKILL.
//
// A worker whose primary goes away (the socket pair ends) shuts itself
// down: no orphan keeps the port. Workers run in their own process group,
// so a terminal's Ctrl-C reaches the primary only, which drains them.
package workers
