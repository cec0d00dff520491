//! A store that remembers the addresses and fingerprints the layer claims, over any store.

use std::sync::{Arc, Mutex};

use tower_idempotency::{Fingerprint, StorageKey, StoreError};

use super::wrap::{Hook, Op, Wrap};

/// Passes every operation to `inner`, and records each claim's key and fingerprint.
pub type Recording<St> = Wrap<St, Claims>;

/// The (key, fingerprint) of every claim, in order.
#[derive(Clone, Default)]
pub struct Claims(Arc<Mutex<Vec<(StorageKey, Fingerprint)>>>);

impl Claims {
    /// The (key, fingerprint) of every claim so far, in order.
    pub fn claims(&self) -> Vec<(StorageKey, Fingerprint)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Hook for Claims {
    async fn before(&self, op: Op<'_>) -> Result<(), StoreError> {
        if let Op::Claim(key, fingerprint) = op {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((*key, *fingerprint));
        }
        Ok(())
    }
}
