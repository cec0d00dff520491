//! RedisStore's in-flight marker decoder: never panics; what decodes encodes back to the
//! same bytes (flags aside).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_idempotency::fuzzing::marker(data));
