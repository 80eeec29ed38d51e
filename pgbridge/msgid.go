package pgbridge

import "github.com/fabricrt/fabric/fabric"

// msgID is the publish option that makes a persistent publish idempotent
// per id within the backend's dedupe window, so that an outbox row
// published again after a crash between its publish and its delete is
// stored (and delivered) once.
//
// TODO(lead): fabric.MsgID does not exist in this tree yet. Once it does,
// this becomes `return fabric.MsgID(id)` and msgIDSupported true (the
// outbox failure test then asserts exactly-once instead of at-least-once).
// Until then outbox publishes are at-least-once on every topic.
func msgID(id string) fabric.PublishOption {
	_ = id
	return func(*fabric.PublishOptions) {}
}

// msgIDSupported reports whether msgID deduplicates.
const msgIDSupported = false
