//! Everything one protected request passes through, in the order it meets it.
//!
//! [`service`] decides whether a request passes through or is protected and finds its key
//! ([`plan`]); a protected request becomes the state machine in [`machine`] (its states and
//! `poll`; `machine/step.rs`: where each answer leads; `machine/rotation.rs`: a key's earlier
//! addresses under previous secrets), boxed in the [`future`] `Idempotency` returns. On its
//! way it reads its body ([`body`], [`chunks`]), holds its claim as a [`lease`], runs the
//! handler once the inner service is [`ready`] (its panic caught by [`catch_unwind`]), and
//! settles the response ([`capture`], streamed through [`stream`], background work started by
//! [`task`]); or it answers from a record ([`replay`], with the [`expiry`] header), decides
//! on an abandoned claim ([`recovery`]), or refuses ([`reject`]).

pub(crate) mod body;
pub(crate) mod capture;
pub(crate) mod catch_unwind;
pub(crate) mod chunks;
pub(crate) mod expiry;
pub(crate) mod future;
pub(crate) mod lease;
pub(crate) mod machine;
pub(crate) mod plan;
pub(crate) mod ready;
pub(crate) mod recovery;
pub(crate) mod reject;
pub(crate) mod replay;
pub(crate) mod service;
pub(crate) mod stream;
pub(crate) mod task;
