//! `Record::decode` on bytes from a store: never panics; what decodes encodes to bytes that
//! decode to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tower_idempotency::fuzzing::record(data));
