//! The operator's tools on [`RedisStore`]: looking a key up, and listing claims with a
//! bounded, cursor-based `SCAN` of the prefix (on each primary of a cluster in turn).

use std::time::{Duration, SystemTime};

use ::redis::{
    Client, Cmd, ConnectionAddr, ErrorKind, ServerErrorKind, Value, aio::ConnectionLike,
};
use bytes::Bytes;

use super::{
    codec::{Completed, ENVELOPE_MAGIC, MARKER_MAGIC, Marker},
    connect::RedisStore,
    error::{Unexpected, store_error},
    script::INSPECT,
};
use crate::{
    key::StorageKey,
    store::error::{StoreError, StoreErrorKind},
    store::inspect::{ClaimInfo, ClaimPage, Inspection, ListCursor, RecordInfo},
};

/// `SCAN` calls one page may make at most, so a page's work is bounded whatever is found.
const SCANS_PER_PAGE: usize = 8;
/// The largest page asked of `SCAN` (`COUNT`) and returned.
const MAX_PAGE: usize = 1000;

/// Where a listing scans: the one server, or each primary of a cluster.
enum Targets {
    Single,
    Cluster(Vec<(String, u16)>),
}

impl Targets {
    fn len(&self) -> usize {
        match self {
            Self::Single => 1,
            Self::Cluster(nodes) => nodes.len(),
        }
    }
}

fn unexpected() -> StoreError {
    StoreError::new(StoreErrorKind::Other, Unexpected::Reply)
}

/// The latest time a stored value or a reply may name: the end of the year 9999, in Unix ms.
/// No clock writes a later one; past it, some platforms cannot represent the time at all.
const LATEST_UNIX_MS: u64 = 253_402_300_799_999;

/// A time out of range: corrupt (bytes written by something else, or a reply Redis never
/// gives), never a panic.
fn bad_time() -> StoreError {
    StoreError::corrupt(Unexpected::Time)
}

/// `ms` since the Unix epoch as a time; past [`LATEST_UNIX_MS`], corrupt.
fn unix_ms(ms: u64) -> Result<SystemTime, StoreError> {
    if ms > LATEST_UNIX_MS {
        return Err(bad_time());
    }
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .ok_or_else(bad_time)
}

/// `at` moved by `ms` (negative: back); before the epoch or past [`LATEST_UNIX_MS`], corrupt.
fn offset(at: SystemTime, ms: i64) -> Result<SystemTime, StoreError> {
    let at = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| bad_time())?;
    let moved = i128::try_from(at.as_millis())
        .map_err(|_| bad_time())?
        .checked_add(i128::from(ms))
        .ok_or_else(bad_time)?;
    unix_ms(u64::try_from(moved).map_err(|_| bad_time())?)
}

/// The time in Redis's `TIME` reply: whole seconds and microseconds, as decimal digits.
fn redis_time(seconds: &[u8], micros: &[u8]) -> Result<SystemTime, StoreError> {
    let number = |digits: &[u8]| {
        std::str::from_utf8(digits)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(unexpected)
    };
    let (seconds, micros) = (number(seconds)?, number(micros)?);
    let ms = seconds
        .checked_mul(1_000)
        .and_then(|ms| ms.checked_add(micros / 1_000))
        .ok_or_else(bad_time)?;
    Ok(unix_ms(ms)? + Duration::from_micros(micros % 1_000))
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(super) async fn inspect_key(
        &self,
        key: &StorageKey,
    ) -> Result<Option<Inspection>, StoreError> {
        let Value::Array(reply) = self.run(&INSPECT, key, &[]).await? else {
            return Err(unexpected());
        };
        let mut reply = reply.into_iter();
        let (value, pttl, seconds, micros) =
            match (reply.next(), reply.next(), reply.next(), reply.next()) {
                (None, ..) => return Ok(None),
                (
                    Some(Value::BulkString(value)),
                    Some(Value::Int(pttl)),
                    Some(Value::BulkString(seconds)),
                    Some(Value::BulkString(micros)),
                ) => (value, pttl, seconds, micros),
                _ => return Err(unexpected()),
            };
        let redis_now = redis_time(&seconds, &micros)?;
        if value.starts_with(MARKER_MAGIC) {
            let marker = Marker::decode(&value)?;
            return Ok(Some(Inspection::InFlight(claim_info(
                *key, &marker, pttl, redis_now,
            )?)));
        }
        if value.starts_with(ENVELOPE_MAGIC) {
            let completed = Completed::decode(Bytes::from(value))?;
            let created = completed.expires_at.saturating_sub(completed.ttl);
            return Ok(Some(Inspection::Completed(RecordInfo::of(
                &completed.record,
                Some(unix_ms(created)?),
                Some(unix_ms(completed.expires_at)?),
            ))));
        }
        Err(StoreError::corrupt(Unexpected::Foreign))
    }

    pub(super) async fn list(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let (mut node, mut scan) = match &cursor {
            None => (0, 0),
            Some(cursor) => parse_cursor(cursor.as_str()).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Other, "not a RedisStore listing cursor")
            })?,
        };
        let targets = self.targets().await?;
        let mut page = ClaimPage::default();
        for _ in 0..SCANS_PER_PAGE {
            if node >= targets.len() || page.claims.len() >= limit {
                break;
            }
            let next = match &targets {
                Targets::Single => {
                    let mut connection = self.connection.clone();
                    self.scan(&mut connection, scan, limit, older_than, &mut page.claims)
                        .await?
                }
                Targets::Cluster(nodes) => {
                    let (host, port) = &nodes[node];
                    let mut connection = self.node_connection(host, *port).await?;
                    self.scan(&mut connection, scan, limit, older_than, &mut page.claims)
                        .await?
                }
            };
            if next == 0 {
                (node, scan) = (node + 1, 0);
            } else {
                scan = next;
            }
        }
        if node < targets.len() {
            page.next = Some(ListCursor::new(format!("{node}:{scan}")));
        }
        Ok(page)
    }

    /// One `SCAN` of the prefix on `connection` from `cursor`, the claims among its keys made
    /// at least `older_than` ago added to `found`; returns the next cursor (0: done).
    async fn scan<K: ConnectionLike + Send>(
        &self,
        connection: &mut K,
        cursor: u64,
        count: usize,
        older_than: Duration,
        found: &mut Vec<ClaimInfo>,
    ) -> Result<u64, StoreError> {
        let prefix = &self.shared.settings.prefix;
        let mut scan = Cmd::new();
        scan.arg("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", glob_escape(prefix)))
            .arg("COUNT")
            .arg(count)
            .arg("TYPE")
            .arg("string");
        let (next, keys): (u64, Vec<Vec<u8>>) = self
            .bounded(scan.query_async(connection), store_error)
            .await?;
        let keys: Vec<(Vec<u8>, StorageKey)> = keys
            .into_iter()
            .filter_map(|redis_key| {
                let digest = std::str::from_utf8(redis_key.get(prefix.len()..)?).ok()?;
                let key = StorageKey::from_hex(digest)?;
                Some((redis_key, key))
            })
            .collect();
        if keys.is_empty() {
            return Ok(next);
        }
        // Keys a SCAN of one node returns live on that node: one pipeline reads them all.
        let mut pipe = ::redis::pipe();
        for (redis_key, _) in &keys {
            pipe.cmd("GETRANGE").arg(redis_key).arg(0).arg(60);
            pipe.cmd("PTTL").arg(redis_key);
        }
        let values: Vec<Value> = self
            .bounded(pipe.query_async(connection), store_error)
            .await?;
        let now = SystemTime::now();
        for ((_, key), pair) in keys.iter().zip(values.chunks_exact(2)) {
            let (Value::BulkString(head), Value::Int(pttl)) = (&pair[0], &pair[1]) else {
                continue;
            };
            // Records, and keys that ended between the scan and the read, are not claims.
            if !head.starts_with(MARKER_MAGIC) || *pttl < 0 {
                continue;
            }
            // A marker that does not decode, or names a time out of range, is not listed.
            let Ok(claim) = Marker::decode(head)
                .map_err(StoreError::from)
                .and_then(|marker| claim_info(*key, &marker, *pttl, now))
            else {
                continue;
            };
            if claim.age(now).is_none_or(|age| age >= older_than) {
                found.push(claim);
            }
        }
        Ok(next)
    }

    /// The one server, or the primaries of the cluster the connection reaches (sorted, so
    /// that a cursor's node index means the same node from one page to the next).
    async fn targets(&self) -> Result<Targets, StoreError> {
        let mut connection = self.connection.clone();
        let mut nodes = Cmd::new();
        nodes.arg("CLUSTER").arg("NODES");
        // Bounded by the response timeout; the server's own error is judged below.
        let asked = async { Ok(nodes.query_async::<String>(&mut connection).await) };
        let reply = self.bounded(asked, store_error).await?;
        let text = match reply {
            Ok(text) => text,
            // "cluster support disabled": a single server.
            Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError) => {
                return Ok(Targets::Single);
            }
            Err(error) => return Err(store_error(error)),
        };
        let mut primaries: Vec<(String, u16)> = text.lines().filter_map(primary).collect();
        primaries.sort();
        primaries.dedup();
        if primaries.is_empty() {
            return Err(unexpected());
        }
        Ok(Targets::Cluster(primaries))
    }

    /// A connection to one node of the cluster, with the settings (database, credentials,
    /// TLS) of the store's own.
    async fn node_connection(
        &self,
        host: &str,
        port: u16,
    ) -> Result<::redis::aio::MultiplexedConnection, StoreError> {
        let Some(template) = self.shared.notifier.clients().first() else {
            return Err(StoreError::new(
                StoreErrorKind::Other,
                "no node address to reach the cluster's primaries with",
            ));
        };
        let info = template.get_connection_info().clone();
        let addr = match info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let client = Client::open(info.set_addr(addr)).map_err(store_error)?;
        self.bounded(client.get_multiplexed_async_connection(), store_error)
            .await
    }
}

/// A claim as listed or inspected: its lease ends when the key's `pttl` is down to the
/// marker's retention, measured from `now`. A time out of range is corrupt.
fn claim_info(
    key: StorageKey,
    marker: &Marker,
    pttl: i64,
    now: SystemTime,
) -> Result<ClaimInfo, StoreError> {
    let retention = i64::try_from(marker.retention).unwrap_or(i64::MAX);
    let lease_left = pttl.saturating_sub(retention);
    let claimed_at = match marker.claimed_at {
        0 => None,
        at => Some(unix_ms(at)?),
    };
    Ok(ClaimInfo::new(
        key,
        marker.token,
        marker.fingerprint,
        claimed_at,
        offset(now, lease_left)?,
    ))
}

/// `{node}:{scan cursor}`.
fn parse_cursor(cursor: &str) -> Option<(usize, u64)> {
    let (node, scan) = cursor.split_once(':')?;
    Some((node.parse().ok()?, scan.parse().ok()?))
}

/// The address of a healthy primary from one line of `CLUSTER NODES`.
fn primary(line: &str) -> Option<(String, u16)> {
    let mut fields = line.split(' ');
    let (_id, address, flags) = (fields.next()?, fields.next()?, fields.next()?);
    let flags: Vec<&str> = flags.split(',').collect();
    let healthy = !flags
        .iter()
        .any(|flag| matches!(*flag, "fail" | "fail?" | "noaddr" | "handshake"));
    if !flags.contains(&"master") || !healthy {
        return None;
    }
    let address = address.split(['@', ',']).next()?;
    let (host, port) = address.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// `prefix` with the characters `SCAN … MATCH` treats as a pattern escaped.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_healthy_primaries_only() {
        let cases = [
            (
                "07c3 127.0.0.1:30004@31004 master - 0 1 1 connected 0-5460",
                Some(("127.0.0.1", 30004)),
            ),
            (
                "e7d1 10.0.0.2:6379@16379,node-b myself,master - 0 0 2 connected 5461-10922",
                Some(("10.0.0.2", 6379)),
            ),
            (
                "67ed 127.0.0.1:30005@31005 slave 07c3 0 1 1 connected",
                None,
            ),
            (
                "292f 127.0.0.1:30006@31006 master,fail - 1 1 3 disconnected",
                None,
            ),
            ("a1b2 :0@0 myself,master - 0 0 0 connected", None),
            ("", None),
        ];
        for (line, expected) in cases {
            let found = primary(line);
            assert_eq!(
                found.as_ref().map(|(host, port)| (host.as_str(), *port)),
                expected,
                "{line}"
            );
        }
    }

    #[test]
    fn cursors_name_a_node_and_its_scan_position() {
        assert_eq!(parse_cursor("0:0"), Some((0, 0)));
        assert_eq!(
            parse_cursor("2:17592186044416"),
            Some((2, 17_592_186_044_416))
        );
        for bad in ["", "1", "a:1", "1:b", "-1:0"] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefixes_are_matched_literally() {
        assert_eq!(glob_escape("idempotency:"), "idempotency:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn marker(claimed_at: u64, retention: u64) -> Marker {
        Marker {
            token: crate::store::FenceToken::new(1),
            fingerprint: crate::fingerprint::Fingerprint::from_bytes([0; 32]),
            claimed_at,
            retention,
        }
    }

    #[test]
    fn a_lease_ends_when_the_key_is_down_to_its_retention() -> Result<(), StoreError> {
        let now = at(1_000_000);
        let marker = marker(990_000, 60_000);
        let key = StorageKey::from_bytes([0; 32]);
        let live = claim_info(key, &marker, 70_000, now)?;
        assert_eq!(live.lease_expires_at(), at(1_010_000));
        assert!(!live.is_abandoned(now));
        let abandoned = claim_info(key, &marker, 50_000, now)?;
        assert_eq!(abandoned.lease_expires_at(), at(990_000));
        assert!(abandoned.is_abandoned(now));
        assert_eq!(abandoned.age(now), Some(Duration::from_secs(10)));
        Ok(())
    }

    #[test]
    fn times_out_of_range_are_corrupt_never_a_panic() {
        let kind = |result: Result<SystemTime, StoreError>| result.map_err(|e| e.kind());
        let corrupt = Err(StoreErrorKind::Corrupt);
        // Unix ms, as stored in markers and envelopes.
        for (ms, expected) in [
            (0, Ok(at(0))),
            (LATEST_UNIX_MS, Ok(at(LATEST_UNIX_MS))),
            (LATEST_UNIX_MS + 1, corrupt),
            (u64::MAX, corrupt),
        ] {
            assert_eq!(kind(unix_ms(ms)), expected, "{ms} ms");
        }
        // A time moved by what a key says is left of its lease.
        for (from, by, expected) in [
            (at(5_000), -5_000, Ok(at(0))),
            (at(5_000), -5_001, corrupt),
            (at(5_000), i64::MIN, corrupt),
            (at(5_000), i64::MAX, corrupt),
            (at(LATEST_UNIX_MS - 1), 1, Ok(at(LATEST_UNIX_MS))),
            (at(LATEST_UNIX_MS), 1, corrupt),
            (SystemTime::UNIX_EPOCH - Duration::from_secs(1), 0, corrupt),
        ] {
            assert_eq!(kind(offset(from, by)), expected, "{from:?} by {by} ms");
        }
        // Redis's TIME reply.
        let unexpected = Err(StoreErrorKind::Other);
        let max = u64::MAX.to_string();
        let cases: [(&[u8], &[u8], _); 7] = [
            (
                b"1700000000",
                b"123456",
                Ok(at(1_700_000_000_123) + Duration::from_micros(456)),
            ),
            (b"0", b"0", Ok(at(0))),
            (max.as_bytes(), b"0", corrupt),
            (b"18446744073709551", b"999999", corrupt),
            (b"1700000000", max.as_bytes(), corrupt),
            (b"-1", b"0", unexpected),
            (b"1700000000", b"x", unexpected),
        ];
        for (seconds, micros, expected) in cases {
            assert_eq!(
                kind(redis_time(seconds, micros)),
                expected,
                "TIME {seconds:?} {micros:?}"
            );
        }
        // Claims whose stored times are out of range.
        let key = StorageKey::from_bytes([0; 32]);
        let now = at(1_700_000_000_000);
        for (marker, pttl) in [
            (marker(u64::MAX, 60_000), 70_000),
            (marker(LATEST_UNIX_MS + 1, 60_000), 70_000),
            (marker(1, u64::MAX), 70_000),
            (marker(1, 0), i64::MAX),
        ] {
            assert_eq!(
                claim_info(key, &marker, pttl, now)
                    .map(|_| ())
                    .map_err(|e| e.kind()),
                Err(StoreErrorKind::Corrupt),
                "{marker:?} with {pttl} ms left"
            );
        }
    }
}
