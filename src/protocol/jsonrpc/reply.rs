//! The responses of a protected JSON-RPC call: whether one answers the call (and may be kept
//! for replay), and a kept one made into a retry's answer, with the retry's `id`.
//!
//! A response is framed as one JSON object (`application/json`) or as Server-Sent Events
//! (`text/event-stream`), one JSON-RPC message per event. Of the messages in a stream, the
//! responses (a `result` or an `error`, no `method`) answer the call; notifications and the
//! server's own requests carry no `id` of the caller's and are replayed as they are.

use std::ops::Range;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use super::{
    scan::{self, Members},
    sse,
};

/// A kept response in which no JSON-RPC response could be given the retry's `id`: the retry
/// must not be answered with it (its client would take it for another call's answer, or
/// never match it).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unanswerable;

/// Whether a response with these headers and body answers a single JSON-RPC call: it carries
/// a JSON-RPC response, and no `error` unless `store_errors`. A 200 with no response in it
/// (an SSE stream that ended after its opening event) answers nothing.
pub(crate) fn answers(headers: &HeaderMap, body: &[u8], store_errors: bool) -> bool {
    let mut answered = false;
    let mut verdict = |members: &Members<'_>| {
        if members.is_response() {
            answered = true;
            store_errors || !members.error
        } else {
            true
        }
    };
    let acceptable = if is_event_stream(headers) {
        sse::events(body)
            .iter()
            .all(|event| scan::scan_one(&event.data(body)).is_none_or(|members| verdict(&members)))
    } else {
        scan::scan_one(body).is_some_and(|members| verdict(&members))
    };
    acceptable && answered
}

/// The body of a replay to a retry whose `id` is `retry_id` (raw JSON text): every JSON-RPC
/// response in `stored` with its `id` replaced by the retry's, as the retry wrote it;
/// everything else byte for byte, and `Content-Length` (if the stored response has one) set
/// to the new length. `stored` is returned as it is (no copy) when every id is the retry's
/// already.
pub(crate) fn with_retry_id(
    stored: Bytes,
    retry_id: &[u8],
    headers: &mut HeaderMap,
) -> Result<Bytes, Unanswerable> {
    let spans = if is_event_stream(headers) {
        stream_ids(&stored)
    } else {
        json_id(&stored).into_iter().collect()
    };
    if spans.is_empty() {
        return Err(Unanswerable);
    }
    if spans.iter().all(|span| &stored[span.clone()] == retry_id) {
        return Ok(stored);
    }
    let removed: usize = spans.iter().map(|span| span.len()).sum();
    let mut body = Vec::with_capacity(stored.len() - removed + spans.len() * retry_id.len());
    let mut at = 0;
    for span in spans {
        body.extend_from_slice(&stored[at..span.start]);
        body.extend_from_slice(retry_id);
        at = span.end;
    }
    body.extend_from_slice(&stored[at..]);
    if headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    Ok(Bytes::from(body))
}

/// Where the `id` of a JSON body that is one JSON-RPC response is.
fn json_id(body: &[u8]) -> Option<Range<usize>> {
    let members = scan::scan_one(body).filter(Members::is_response)?;
    scan::id_span(body, members.id?)
}

/// Where the `id` of each JSON-RPC response in an event stream is, in order; none if one of
/// them cannot be rewritten.
fn stream_ids(body: &[u8]) -> Vec<Range<usize>> {
    let mut spans = Vec::new();
    for event in sse::events(body) {
        let data = event.data(body);
        let Some(members) = scan::scan_one(&data).filter(Members::is_response) else {
            continue;
        };
        let span = members
            .id
            .and_then(|raw| scan::id_span(&data, raw))
            .and_then(|span| event.locate(span));
        match span {
            Some(span) => spans.push(span),
            None => return Vec::new(),
        }
    }
    spans
}

/// Whether the response is framed as Server-Sent Events.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|value| {
        let essence = value.as_bytes().split(|&b| b == b';').next().unwrap_or(&[]);
        essence
            .trim_ascii()
            .eq_ignore_ascii_case(b"text/event-stream")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSE: &str = "text/event-stream";
    const JSON: &str = "application/json";

    fn headers(content_type: &str, length: Option<usize>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        if let Some(length) = length {
            headers.insert(header::CONTENT_LENGTH, length.into());
        }
        headers
    }

    #[test]
    fn only_a_response_that_answers_the_call_is_kept() {
        let ok = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}}"#;
        let failed = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32603,"message":"boom"}}"#;
        let priming = "id: 0\nretry: 3000\ndata: \n\n";
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":50}}"#;
        let cases = [
            // (content type, body, kept, kept when errors are stored)
            (JSON, ok.to_owned(), true, true),
            (JSON, failed.to_owned(), false, true),
            (JSON, String::new(), false, false),
            (JSON, "not json".to_owned(), false, false),
            (
                JSON,
                r#"{"jsonrpc":"2.0","method":"x"}"#.to_owned(),
                false,
                false,
            ),
            (JSON, format!("[{ok}]"), false, false),
            (JSON, r#"{"id":1,"result":{}}"#.to_owned(), false, false),
            (SSE, format!("{priming}data: {ok}\nid: 1\n\n"), true, true),
            (
                SSE,
                format!("data: {progress}\n\ndata: {ok}\n\n"),
                true,
                true,
            ),
            (SSE, format!("{priming}data: {failed}\n\n"), false, true),
            (
                SSE,
                format!("data: {ok}\n\ndata: {failed}\n\n"),
                false,
                true,
            ),
            // The stream rmcp ends after its opening event when the call is cancelled.
            (SSE, priming.to_owned(), false, false),
            (SSE, format!("data: {progress}\n\n"), false, false),
            (SSE, String::new(), false, false),
            // A response never dispatched (no blank line after it) answers nothing.
            (SSE, format!("data: {ok}\n"), false, false),
            (
                "text/event-stream; charset=utf-8",
                format!("data: {ok}\n\n"),
                true,
                true,
            ),
            ("TEXT/Event-Stream", format!("data: {ok}\n\n"), true, true),
        ];
        for (content_type, body, kept, kept_with_errors) in cases {
            let headers = headers(content_type, None);
            assert_eq!(
                answers(&headers, body.as_bytes(), false),
                kept,
                "{content_type} {body:?}"
            );
            assert_eq!(
                answers(&headers, body.as_bytes(), true),
                kept_with_errors,
                "{content_type} {body:?}, errors stored"
            );
        }
    }

    fn replay(
        content_type: &str,
        stored: &str,
        retry_id: &str,
    ) -> Result<(String, String), Unanswerable> {
        let mut headers = headers(content_type, Some(stored.len()));
        let body = with_retry_id(
            Bytes::from(stored.to_owned()),
            retry_id.as_bytes(),
            &mut headers,
        )?;
        let length = headers[header::CONTENT_LENGTH].to_str().unwrap().to_owned();
        Ok((String::from_utf8(body.to_vec()).unwrap(), length))
    }

    #[test]
    fn a_replay_answers_with_the_retrys_id_and_nothing_else_changes() {
        let json = r#"{"jsonrpc":"2.0", "id": 1 ,"result":{"id":1,"content":[{"type":"text","text":"sent"}]}}"#;
        for retry in [r#""retry-2""#, "3", "null", r#""caf\u00e9""#, "1.50"] {
            let (body, length) = replay(JSON, json, retry).unwrap();
            assert_eq!(
                body,
                json.replacen(" 1 ", &format!(" {retry} "), 1),
                "{retry}"
            );
            assert_eq!(length, body.len().to_string());
        }
        let stream = concat!(
            "id: 0\r\nretry: 3000\r\ndata: \r\n\r\n",
            "event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":1}}\r\n\r\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"sampling/createMessage\"}\r\n\r\n",
            "event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"id\":1}}\r\nid: 3\r\n\r\n",
        );
        let (body, length) = replay(SSE, stream, r#""b-7""#).unwrap();
        assert_eq!(
            body,
            stream.replace(r#""id":1,"result""#, r#""id":"b-7","result""#),
            "only the response's id changes: not the event id, the progress token, the \
             server's own request or the result"
        );
        assert_eq!(length, body.len().to_string());
        // An id split over data lines is found in its line.
        let split = "data: {\"jsonrpc\":\"2.0\",\ndata: \"id\":1,\"result\":{}}\n\n";
        assert_eq!(
            replay(SSE, split, "22").unwrap().0,
            "data: {\"jsonrpc\":\"2.0\",\ndata: \"id\":22,\"result\":{}}\n\n"
        );
    }

    #[test]
    fn a_kept_response_that_cannot_carry_the_retrys_id_is_not_replayed_to_it() {
        let cases = [
            (JSON, ""),
            (JSON, "plain text"),
            (JSON, r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#),
            (JSON, r#"{"jsonrpc":"2.0","result":{"id":1}}"#),
            (JSON, r#"{"jsonrpc":"2.0","id":{"a":1},"result":{}}"#),
            (JSON, r#"{"jsonrpc":"2.0","id":1,"id":2,"result":{}}"#),
            (JSON, r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#),
            (
                JSON,
                "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n",
            ),
            (SSE, "id: 0\nretry: 3000\ndata: \n\n"),
            (SSE, r#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            (
                SSE,
                "data: {\"jsonrpc\":\"2.0\",\"id\":[1],\"result\":{}}\n\n",
            ),
            (
                SSE,
                "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":true,\"error\":{}}\n\n",
            ),
        ];
        for (content_type, stored) in cases {
            assert_eq!(
                replay(content_type, stored, "9"),
                Err(Unanswerable),
                "{content_type} {stored:?}"
            );
        }
    }

    #[test]
    fn an_unchanged_id_costs_no_copy() {
        for (content_type, stored) in [
            (JSON, &br#"{"jsonrpc":"2.0","id":5,"result":1}"#[..]),
            (
                SSE,
                b"data: {\"jsonrpc\":\"2.0\",\"id\":5,\"result\":1}\n\n",
            ),
        ] {
            let stored = Bytes::from_static(stored);
            let body =
                with_retry_id(stored.clone(), b"5", &mut headers(content_type, None)).unwrap();
            assert_eq!(body.as_ptr(), stored.as_ptr());
        }
    }
}
