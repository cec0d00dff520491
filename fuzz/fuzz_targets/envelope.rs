//! RedisStore's completed-envelope decoder, and reading any value a key may hold: never
//! panics; what decodes is rebuilt into an envelope that decodes the same, and reports a
//! lifetime within its TTL.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_idempotency::fuzzing::envelope(data));
