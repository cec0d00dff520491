//! Key parsing (`IdempotencyKey::parse`, reading the key header): never panics; a key
//! accepted is 1 to 255 visible ASCII bytes, and the same key in bare and quoted form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_idempotency::fuzzing::key(data));
