//! Property: whatever the handler answers (status, header list, body bytes; whole or
//! streamed), the replay is the same response plus `Idempotent-Replayed: true` (SPEC §6).

mod common;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use common::service::{Handler, Step, header_list, keyed_post, respond, scripted, send, serve};

/// Header names to draw from: repeats are likely, none is hop-by-hop or the replay marker.
const NAMES: &[&str] = &[
    "set-cookie",
    "content-type",
    "x-a",
    "x-b",
    "link",
    "vary",
    "etag",
    "x-request-id",
    "www-authenticate",
];

/// Bytes a header value may hold: visible ASCII, space, tab and obs-text.
fn value_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => Just(b' '),
        1 => Just(b'\t'),
        3 => 0x80u8..=0xff,
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    prop::collection::vec(value_byte(), 0..40)
        .prop_map(|bytes| HeaderValue::from_bytes(&bytes).expect("only allowed bytes"))
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec((prop::sample::select(NAMES), header_value()), 0..12).prop_map(|pairs| {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(HeaderName::from_static(name), value);
        }
        headers
    })
}

#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    /// Split the body into chunks of this size, pausing between them (the streaming path);
    /// `None` sends it in one frame.
    chunked: Option<usize>,
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        200u16..=599,
        headers(),
        prop::collection::vec(any::<u8>(), 0..4096),
        prop::option::of(1usize..1024),
    )
        .prop_map(|(status, headers, body, chunked)| Answer {
            status: StatusCode::from_u16(status).expect("a valid status"),
            headers,
            body,
            chunked,
        })
}

fn steps(answer: &Answer) -> Vec<Step> {
    let body = Bytes::from(answer.body.clone());
    match answer.chunked {
        None => vec![Step::Data(body)],
        Some(size) => body
            .chunks(size)
            .flat_map(|chunk| [Step::Data(Bytes::copy_from_slice(chunk)), Step::Yield])
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_replay_is_the_first_response_plus_the_replayed_header(answer in answer()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let expected = answer.clone();
            let handler = Handler::new(move |_request| {
                let answer = expected.clone();
                async move {
                    let mut response = respond(answer.status, scripted(steps(&answer)));
                    *response.headers_mut() = answer.headers.clone();
                    response
                }
            });
            let layer = IdempotencyLayer::new(MemoryStore::default())
                .with_store_when(|_: &http::response::Parts| true);
            let svc = serve(&layer, &handler);
            let first = send(&svc, keyed_post("/p", "k", "{}")).await;
            let replay = send(&svc, keyed_post("/p", "k", "{}")).await;

            prop_assert_eq!(handler.calls(), 1);
            prop_assert_eq!(first.status, answer.status);
            prop_assert_eq!(&first.headers, &answer.headers);
            prop_assert_eq!(header_list(&first.headers), header_list(&answer.headers));
            prop_assert_eq!(&first.body[..], &answer.body[..]);
            prop_assert!(!first.replayed());

            prop_assert!(replay.replayed());
            prop_assert_eq!(replay.status, first.status);
            prop_assert_eq!(replay.header_list(), header_list(&first.headers));
            prop_assert_eq!(replay.headers.len(), first.headers.len() + 1);
            prop_assert_eq!(&replay.body, &first.body);
            Ok(())
        })?;
    }
}
