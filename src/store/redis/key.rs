//! A storage key's name in Redis: the store's prefix, then the digest's lowercase hex digits,
//! spelled on the stack when the prefix is short enough.

use crate::fingerprint::digest::{push_hex, write_hex};

/// How long a Redis key may be to be built on the stack: a prefix of up to 64 bytes.
const INLINE_KEY: usize = 128;

/// A Redis key, on the stack if it fits: made only by [`spell`], so an inline key's length
/// is never over [`INLINE_KEY`].
pub(super) struct RedisKey(Spelled);

enum Spelled {
    Inline { bytes: [u8; INLINE_KEY], len: usize },
    Heap(String),
}

impl RedisKey {
    pub(super) fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            // `len` is at most `INLINE_KEY` (`spell`): this never panics.
            Spelled::Inline { bytes, len } => &bytes[..*len],
            Spelled::Heap(key) => key.as_bytes(),
        }
    }
}

/// The Redis key of a storage key's `digest` under `prefix`: the prefix's bytes, then the
/// digest's lowercase hex digits.
pub(super) fn spell_string(prefix: &str, digest: &[u8; 32]) -> String {
    // One allocation, the size it ends at (`format!` with `hex` made two, and grew).
    let mut redis_key = String::with_capacity(prefix.len() + 2 * digest.len());
    redis_key.push_str(prefix);
    push_hex(&mut redis_key, digest);
    redis_key
}

/// The same key as [`spell_string`], on the stack when the prefix is short enough.
pub(super) fn spell(prefix: &str, digest: &[u8; 32]) -> RedisKey {
    let len = prefix.len() + 2 * digest.len();
    let mut bytes = [0; INLINE_KEY];
    let Some(inline) = bytes.get_mut(..len) else {
        return RedisKey(Spelled::Heap(spell_string(prefix, digest)));
    };
    let (start, hex) = inline.split_at_mut(prefix.len());
    start.copy_from_slice(prefix.as_bytes());
    write_hex(hex, digest);
    RedisKey(Spelled::Inline { bytes, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest whose bytes are all different, so that a digit out of place shows.
    fn digest() -> [u8; 32] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(0xa5))
    }

    /// The key as `redis_key` spells it, and as `format!` would, which must agree.
    fn expected(prefix: &str, digest: &[u8; 32]) -> String {
        let spelled = spell_string(prefix, digest);
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(spelled, format!("{prefix}{hex}"));
        spelled
    }

    fn assert_spelled(prefix: &str) {
        let digest = digest();
        let key = spell(prefix, &digest);
        assert_eq!(
            key.as_bytes(),
            expected(prefix, &digest).as_bytes(),
            "a prefix of {} bytes",
            prefix.len()
        );
        let inline = matches!(key.0, Spelled::Inline { .. });
        assert_eq!(
            inline,
            prefix.len() <= 64,
            "a prefix of {} bytes",
            prefix.len()
        );
    }

    #[test]
    fn a_command_names_the_key_redis_key_names_for_every_prefix_length() {
        // 64 bytes is the last prefix on the stack (64 + 64 hex digits = `INLINE_KEY`).
        for len in 0..=130 {
            let prefix: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            assert_spelled(&prefix);
        }
    }

    #[test]
    fn a_multi_byte_prefix_is_copied_whole_on_either_side_of_the_stack_bound() {
        // 2-, 3- and 4-byte characters, repeated across 64 bytes: 63, 64, 66 bytes and more.
        for character in ['é', '€', '🦀'] {
            for count in 0..=70 / character.len_utf8() {
                let prefix: String = std::iter::repeat_n(character, count).collect();
                assert_spelled(&prefix);
            }
        }
        assert_spelled("idempotency:é€🦀:");
        // A 63-byte ASCII run then a 2-byte character: 65 bytes, one past the bound.
        assert_spelled(&format!("{}é", "x".repeat(63)));
    }
}
