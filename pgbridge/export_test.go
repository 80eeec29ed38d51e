package pgbridge

// Kill stops b as a crash would: no lease released, no transaction
// committed or rolled back, every socket cut.
func Kill(b *Bridge) { b.kill() }

// DedupeSupported reports whether outbox publishes carry a message id the
// history deduplicates (fabric.MsgID).
const DedupeSupported = msgIDSupported
