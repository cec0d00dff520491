//! What a store reports to an operator: the state of one key, and the claims in flight.
//!
//! Pure logic: no tower or tokio in here. Stores build these values; the
//! [admin router](crate::admin) (feature `axum`) turns them into JSON.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use http::{HeaderValue, Method, Request, StatusCode, header};

use crate::{
    fingerprint::Fingerprint,
    fingerprint::digest::{FieldHasher, Secret},
    key::{IdempotencyKey, KeyRef, Scope, StorageKey},
    record::Record,
    store::claim::FenceToken,
};

/// What a store holds under one key, as [`AdminStore::inspect`] reports it.
///
/// [`AdminStore::inspect`]: crate::AdminStore::inspect
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspection {
    /// A request holds the key, or held it and its lease expired without completion.
    InFlight(ClaimInfo),
    /// The key's request completed.
    Completed(RecordInfo),
}

/// A claim on a key: who holds it, since when, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    key: StorageKey,
    token: FenceToken,
    fingerprint: Fingerprint,
    claimed_at: Option<SystemTime>,
    lease_expires_at: SystemTime,
}

impl ClaimInfo {
    /// A claim on `key` by `token` for a request of `fingerprint`, made at `claimed_at` (if
    /// the store knows) and held until `lease_expires_at`.
    pub fn new(
        key: StorageKey,
        token: FenceToken,
        fingerprint: Fingerprint,
        claimed_at: Option<SystemTime>,
        lease_expires_at: SystemTime,
    ) -> Self {
        Self {
            key,
            token,
            fingerprint,
            claimed_at,
            lease_expires_at,
        }
    }

    /// The key claimed.
    pub fn key(&self) -> &StorageKey {
        &self.key
    }

    /// The owner's fence token.
    pub fn token(&self) -> FenceToken {
        self.token
    }

    /// The fingerprint of the owner's request.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// When the claim was made, by the clock of the instance that made it, if the store
    /// knows.
    pub fn claimed_at(&self) -> Option<SystemTime> {
        self.claimed_at
    }

    /// When the owner's lease ends (or ended), unless renewed.
    pub fn lease_expires_at(&self) -> SystemTime {
        self.lease_expires_at
    }

    /// Whether the lease has ended as of `now`: the owner stopped renewing it without
    /// completing or releasing the key (it crashed, or lost the store). The outcome of its
    /// request is unknown.
    pub fn is_abandoned(&self, now: SystemTime) -> bool {
        self.lease_expires_at <= now
    }

    /// How long the claim has been held as of `now`; `None` when the store does not know
    /// when it was made.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.claimed_at
            .map(|at| now.duration_since(at).unwrap_or_default())
    }
}

/// A completed record, summed up: what an operator needs to judge it, without its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    fingerprint: Fingerprint,
    status: StatusCode,
    replayable: bool,
    header_count: usize,
    body_len: usize,
    created_at: Option<SystemTime>,
    expires_at: Option<SystemTime>,
}

impl RecordInfo {
    /// Sums `record` up; `created_at` and `expires_at` as far as the store knows them.
    pub fn of(
        record: &Record,
        created_at: Option<SystemTime>,
        expires_at: Option<SystemTime>,
    ) -> Self {
        Self {
            fingerprint: *record.fingerprint(),
            status: record.status(),
            replayable: record.is_replayable(),
            header_count: record.headers().map_or(0, http::HeaderMap::len),
            body_len: record.body().map_or(0, bytes::Bytes::len),
            created_at,
            expires_at,
        }
    }

    /// The fingerprint of the request that produced it.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// The status of the original response.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Whether the response was kept whole (not over the response limit).
    pub fn is_replayable(&self) -> bool {
        self.replayable
    }

    /// How many header values the response has (repeats counted).
    pub fn header_count(&self) -> usize {
        self.header_count
    }

    /// The length of the response body kept, in bytes.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// When the record was stored, if the store knows.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.created_at
    }

    /// When the store drops it, if the store knows.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
}

/// Where a listing of claims goes on: an opaque position that only the store that issued it
/// understands.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ListCursor(String);

impl ListCursor {
    /// Wraps a position a store issued (what [`as_str`](Self::as_str) returned).
    pub fn new(position: impl Into<String>) -> Self {
        Self(position.into())
    }

    /// The position, as text (to hand to a client and back).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ListCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ListCursor({:?})", self.0)
    }
}

/// One page of [`AdminStore::list_claims`].
///
/// [`AdminStore::list_claims`]: crate::AdminStore::list_claims
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClaimPage {
    /// The claims found on this page (possibly none, even when more pages follow).
    pub claims: Vec<ClaimInfo>,
    /// Where the next page starts; `None` once the listing is complete.
    pub next: Option<ListCursor>,
}

/// Whose key a record is under, to find the record of a client-keyed request
/// ([`StorageKey::of_request`]).
#[derive(Debug, Clone, Copy)]
pub enum LookupScope<'a> {
    /// The layer's scope is the default: the request's `Authorization` header (`None` when
    /// the request had none).
    Credentials(Option<&'a HeaderValue>),
    /// The layer's scope is set with `with_scope`: what that closure returned for the
    /// request.
    Principal(&'a [u8]),
}

impl StorageKey {
    /// The address of the record a request with a client-sent `key` got, for `method` and
    /// `path` (without the query) under `scope`: what an operator looks a record up by.
    ///
    /// ```
    /// use http::Method;
    /// use tower_idempotency::{IdempotencyKey, LookupScope, StorageKey};
    ///
    /// let key = IdempotencyKey::parse(b"8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap();
    /// let digest = StorageKey::of_request(LookupScope::Principal(b"acct_1"), &Method::POST, "/charges", &key);
    /// assert_eq!(digest.to_hex().len(), 64);
    /// ```
    pub fn of_request(
        scope: LookupScope<'_>,
        method: &Method,
        path: &str,
        key: &IdempotencyKey,
    ) -> Self {
        Self::of_lookup(None, scope, method, path, key)
    }

    /// As [`of_request`](Self::of_request), for a layer configured
    /// [`with_secret`](crate::IdempotencyLayer::with_secret): its storage keys are keyed by
    /// `secret`.
    ///
    /// ```
    /// use http::Method;
    /// use tower_idempotency::{IdempotencyKey, LookupScope, StorageKey};
    ///
    /// let key = IdempotencyKey::parse(b"k-1").unwrap();
    /// let scope = LookupScope::Principal(b"acct_1");
    /// let keyed = StorageKey::of_keyed_request(b"server secret", scope, &Method::POST, "/charges", &key);
    /// assert_ne!(keyed, StorageKey::of_request(scope, &Method::POST, "/charges", &key));
    /// ```
    pub fn of_keyed_request(
        secret: impl AsRef<[u8]>,
        scope: LookupScope<'_>,
        method: &Method,
        path: &str,
        key: &IdempotencyKey,
    ) -> Self {
        let secret = Secret::new(secret.as_ref());
        Self::of_lookup(Some(&secret), scope, method, path, key)
    }

    pub(crate) fn of_lookup(
        secret: Option<&Secret>,
        scope: LookupScope<'_>,
        method: &Method,
        path: &str,
        key: &IdempotencyKey,
    ) -> Self {
        let mut request = Request::builder().method(method.clone());
        // A path that is not a valid URI path cannot have been requested; hash it anyway,
        // so the lookup finds nothing rather than failing.
        request = match http::Uri::try_from(path) {
            Ok(uri) => request.uri(uri),
            Err(_) => request.uri("/"),
        };
        let (scope, request) = match scope {
            LookupScope::Credentials(authorization) => {
                let request = match authorization {
                    Some(value) => request.header(header::AUTHORIZATION, value.clone()),
                    None => request,
                };
                (Scope::Credentials, request)
            }
            LookupScope::Principal(principal) => {
                let principal = principal.to_vec();
                (Scope::custom(move |_| principal.clone()), request)
            }
        };
        let (parts, ()) = request
            .body(())
            .unwrap_or_else(|_| Request::new(()))
            .into_parts();
        let hasher = FieldHasher::for_secret(secret);
        Self::derive_with(hasher, &scope, false, method, &parts, KeyRef::Client(key))
    }

    /// Parses 64 hex digits (what [`to_hex`](Self::to_hex) writes, either case).
    ///
    /// ```
    /// use tower_idempotency::StorageKey;
    ///
    /// let key = StorageKey::from_bytes([0xab; 32]);
    /// assert_eq!(StorageKey::from_hex(&key.to_hex()), Some(key));
    /// assert_eq!(StorageKey::from_hex("abc"), None);
    /// ```
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
        }
        Some(Self::from_bytes(bytes))
    }
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, Uri, request::Parts};

    fn parts(uri: &str, authorization: Option<&str>) -> Parts {
        let mut request = Request::post(uri);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_lookup_finds_the_address_the_layer_derived() {
        let key = IdempotencyKey::parse(b"k-1").unwrap();
        let bearer = HeaderValue::from_static("Bearer abc");
        let with_query = parts("/charges?x=1", Some("Bearer abc"));
        let layer_credentials = StorageKey::derive(
            &Scope::Credentials,
            &Method::POST,
            &with_query,
            KeyRef::Client(&key),
        );
        let layer_principal = StorageKey::derive(
            &Scope::custom(|_: &Parts| "acct_1"),
            &Method::POST,
            &parts("/charges", None),
            KeyRef::Client(&key),
        );
        let cases = [
            (
                "credentials",
                StorageKey::of_request(
                    LookupScope::Credentials(Some(&bearer)),
                    &Method::POST,
                    "/charges",
                    &key,
                ),
                layer_credentials,
                true,
            ),
            (
                "principal",
                StorageKey::of_request(
                    LookupScope::Principal(b"acct_1"),
                    &Method::POST,
                    "/charges",
                    &key,
                ),
                layer_principal,
                true,
            ),
            (
                "another principal",
                StorageKey::of_request(
                    LookupScope::Principal(b"acct_2"),
                    &Method::POST,
                    "/charges",
                    &key,
                ),
                layer_principal,
                false,
            ),
            (
                "no credentials",
                StorageKey::of_request(
                    LookupScope::Credentials(None),
                    &Method::POST,
                    "/charges",
                    &key,
                ),
                layer_credentials,
                false,
            ),
            (
                "another method",
                StorageKey::of_request(
                    LookupScope::Principal(b"acct_1"),
                    &Method::PATCH,
                    "/charges",
                    &key,
                ),
                layer_principal,
                false,
            ),
        ];
        for (what, looked_up, derived, same) in cases {
            assert_eq!(looked_up == derived, same, "{what}");
        }
    }

    #[test]
    fn hex_digests_parse_back_and_anything_else_is_refused() {
        let key = StorageKey::from_bytes(core::array::from_fn(|i| i as u8 * 7));
        assert_eq!(StorageKey::from_hex(&key.to_hex()), Some(key));
        assert_eq!(
            StorageKey::from_hex(&key.to_hex().to_uppercase()),
            Some(key)
        );
        let long = "0".repeat(66);
        let cases = [
            "",
            "00",
            &long,
            &"g".repeat(64),
            &format!("{}zz", &key.to_hex()[..62]),
        ];
        for case in cases {
            assert_eq!(StorageKey::from_hex(case), None, "{case}");
        }
    }

    #[test]
    fn a_record_is_summed_up_without_its_body() {
        let fingerprint = Fingerprint::of(&Method::POST, &Uri::from_static("/"), b"");
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let record = Record::response(
            fingerprint,
            StatusCode::CREATED,
            &headers,
            Bytes::from_static(b"12345"),
            None,
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let info = RecordInfo::of(&record, Some(at), None);
        assert_eq!(
            (
                info.status(),
                info.is_replayable(),
                info.header_count(),
                info.body_len()
            ),
            (StatusCode::CREATED, true, 2, 5)
        );
        assert_eq!((info.created_at(), info.expires_at()), (Some(at), None));
        let too_large = RecordInfo::of(
            &Record::not_replayable(fingerprint, StatusCode::OK),
            None,
            None,
        );
        assert_eq!(
            (too_large.is_replayable(), too_large.body_len()),
            (false, 0)
        );
    }

    #[test]
    fn a_claim_is_abandoned_once_its_lease_has_ended() {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let claim = ClaimInfo::new(
            StorageKey::from_bytes([1; 32]),
            FenceToken::new(1),
            Fingerprint::from_bytes([2; 32]),
            Some(at(100)),
            at(130),
        );
        assert!(!claim.is_abandoned(at(129)));
        assert!(claim.is_abandoned(at(130)));
        assert_eq!(claim.age(at(160)), Some(Duration::from_secs(60)));
        assert_eq!(claim.age(at(50)), Some(Duration::ZERO));
    }
}
