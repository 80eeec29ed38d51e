package pgbridge

import "github.com/fabricrt/fabric/fabric"

// msgID is the publish option that makes a persistent publish idempotent
// per id within the backend's dedupe window, so that an outbox row
// published again after a crash between its publish and its delete is
// stored (and delivered) once.
func msgID(id string) fabric.PublishOption { return fabric.MsgID(id) }

// msgIDSupported reports whether msgID deduplicates.
const msgIDSupported = true
