// Preloaded with `node --import ./register-shim.mjs harness.mjs ...`.
// Installs the resolve hook in shim-hooks.mjs (see README.md for why).
import { register } from 'node:module';

register('./shim-hooks.mjs', import.meta.url);
