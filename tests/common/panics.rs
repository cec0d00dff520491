//! Catching a panic and reading its message, for tables of settings that must panic.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// The message `f` panicked with; `None` if it returned.
pub fn panic_message(f: impl FnOnce()) -> Option<String> {
    let panic = catch_unwind(AssertUnwindSafe(f)).err()?;
    Some(
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| String::from("(a panic without a message)")),
    )
}

/// Checks that `f` panicked with a message starting with `setter`, or returned when `setter`
/// is `None`.
pub fn assert_refused_by(what: &str, refused_by: Option<&str>, f: impl FnOnce()) {
    match (refused_by, panic_message(f)) {
        (None, None) => {}
        (Some(setter), Some(message)) => assert!(
            message.starts_with(setter),
            "{what}: the message names {setter}: {message}"
        ),
        (refused_by, message) => {
            panic!("{what}: expected a refusal by {refused_by:?}, got {message:?}")
        }
    }
}
