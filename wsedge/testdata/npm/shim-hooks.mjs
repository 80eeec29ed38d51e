// ESM resolve hook (node:module register). It changes exactly one thing:
// when a module inside the svelte-realtime package imports
// 'svelte-adapter-uws/client', it gets adapter-client-shim.mjs instead.
// Every other import, including the shim's own import of
// 'svelte-adapter-uws/client' and the adapter plugins' relative imports of
// '../../client.js', resolves normally, so there is one adapter client
// module (one connection singleton) in the process.
//
// Why: the npm registry reachable here has svelte-adapter-uws 0.3.4 only,
// while svelte-realtime 0.5.12 is written against ^0.5.3 and imports
// named exports 0.3.4 does not have. Neither package is modified.

const SHIM = new URL('./adapter-client-shim.mjs', import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
	if (
		specifier === 'svelte-adapter-uws/client' &&
		context.parentURL &&
		context.parentURL.includes('/node_modules/svelte-realtime/')
	) {
		return { url: SHIM, shortCircuit: true };
	}
	return nextResolve(specifier, context);
}
