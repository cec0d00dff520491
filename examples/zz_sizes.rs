use std::time::Duration;
use tower_idempotency::{
    FenceToken, Fingerprint, IdempotencyStore, Record, RedisStore, StorageKey,
};
fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let key = StorageKey::from_bytes([1; 32]);
        let fp = Fingerprint::from_bytes([2; 32]);
        let t = FenceToken::new(5);
        let r = RedisStore::connect("redis://127.0.0.1:26399")
            .await
            .unwrap();
        let rec = Record::response(
            fp,
            http::StatusCode::OK,
            &http::HeaderMap::new(),
            bytes::Bytes::new(),
            None,
        );
        println!(
            "redis claim_as {}",
            std::mem::size_of_val(&r.claim_as(&key, t, &fp, Duration::from_secs(1)))
        );
        println!(
            "redis release {}",
            std::mem::size_of_val(&r.release(&key, t))
        );
        println!(
            "redis complete {}",
            std::mem::size_of_val(&r.complete(&key, t, rec, Duration::from_secs(1)))
        );
    });
}
