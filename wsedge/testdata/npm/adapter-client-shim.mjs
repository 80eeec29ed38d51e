// What svelte-realtime 0.5.12's client sees as 'svelte-adapter-uws/client'
// (routed here by shim-hooks.mjs).
//
// svelte-realtime 0.5.12 imports { connect, on, status, denials, onRequest }
// from the adapter client and re-exports { onDerived, failure } from it; it
// peer-requires svelte-adapter-uws ^0.5.3. The registry reachable here has
// only 0.3.4, whose client exports connect, on, status, ready, crud, lookup,
// latest, count and once. Everything 0.3.4 has is re-exported untouched
// (same module instance, same connection); the four names it lacks are
// supplied below, each behaving as the 0.5 adapter does when the event it
// reports never happens:
//
// - denials: a readable store of the latest subscribe denial
//   ({ topic, reason, ref }) or null. 0.3.4 ignores the server's
//   {"type":"subscribe-denied"} frames, so this store stays null forever.
//   svelte-realtime only subscribes to it and skips null values.
// - onRequest(handler): registers the handler for server-initiated
//   requests and returns an unsubscribe function. 0.3.4 has no such
//   requests, so the handler is never called. svelte-realtime calls it only
//   from onPush().
// - failure: a readable store of the cause of the last non-open status, or
//   null. 0.3.4 reports no causes, so it stays null (the 0.5 value while
//   connected). svelte-realtime only re-exports it.
// - onDerived(topicFn, store): the 0.5 helper, written here on 0.3.4's on():
//   a readable store of the latest event of topic topicFn(value), following
//   store's value (null while the value is null or undefined).
//   svelte-realtime only re-exports it.

import { on } from 'svelte-adapter-uws/client';
import { readable } from 'svelte/store';

export * from 'svelte-adapter-uws/client';

export const denials = readable(null);

export const failure = readable(null);

export function onRequest(handler) {
	if (typeof handler !== 'function') {
		throw new TypeError('onRequest: handler must be a function');
	}
	return () => {};
}

export function onDerived(topicFn, store) {
	return readable(null, (set) => {
		let current = null;
		let topicUnsub = null;
		const storeUnsub = store.subscribe((value) => {
			const topic = value == null ? null : topicFn(value);
			if (topic === current && topicUnsub) return;
			if (topicUnsub) topicUnsub();
			topicUnsub = null;
			current = topic;
			if (topic == null) set(null);
			else topicUnsub = on(topic).subscribe(set);
		});
		return () => {
			storeUnsub();
			if (topicUnsub) topicUnsub();
		};
	});
}
