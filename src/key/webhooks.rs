//! Ready key sources for senders that never send `Idempotency-Key`: webhook providers, each
//! by the field it documents as the same across re-deliveries of one event, and each scoped
//! by what tells two subscribers of one event apart ([`Delivery`]).
//!
//! Pure logic: no tower or tokio in here.

use http::HeaderName;

use super::{KeySource, delivery::Delivery};

/// GitHub's delivery id header: one per event, shared by every hook the event is sent to.
const X_GITHUB_DELIVERY: HeaderName = HeaderName::from_static("x-github-delivery");
/// Shopify's event id header: one per event, shared by every subscription it is sent to.
const X_SHOPIFY_EVENT_ID: HeaderName = HeaderName::from_static("x-shopify-event-id");
/// The Standard Webhooks message id header (white-labelled senders).
const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
/// Svix's message id header: Svix's default, sent by Clerk, Resend and other Svix users.
const SVIX_ID: HeaderName = HeaderName::from_static("svix-id");

impl KeySource {
    /// A Stripe event: its `id` (`evt_…`), the body's top-level `/id`. Stripe re-sends the same
    /// event object on every retry (for up to three days in live mode) and asks receivers to
    /// deduplicate by it.
    ///
    /// Stripe signs each delivery anew (`Stripe-Signature` carries a fresh timestamp), which
    /// does not matter: headers are not part of the fingerprint unless you ask.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_key_source(KeySource::stripe_event());
    /// ```
    pub fn stripe_event() -> Self {
        Self::json_pointer("/id")
    }

    /// A GitHub webhook delivery: `X-GitHub-Delivery`, a GUID that GitHub keeps when a
    /// delivery is redelivered, scoped by `X-GitHub-Hook-ID` (and
    /// `X-GitHub-Hook-Installation-Target-Type` / `-ID` where present).
    ///
    /// The GUID names the event, not the hook: every hook and App subscribed to one event
    /// receives it with the same GUID. Each hook's delivery is therefore a record of its own
    /// (each runs the handler once); a redelivery to one hook is replayed its first answer.
    /// GitHub does not retry a failed delivery, so a second hook must never be refused.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_key_source(KeySource::github_delivery());
    /// ```
    pub fn github_delivery() -> Self {
        Self::delivery_header(X_GITHUB_DELIVERY, Delivery::GitHub)
    }

    /// A Shopify webhook: `X-Shopify-Event-Id`, which Shopify's guide to ignoring duplicate
    /// webhooks names as the value a duplicate repeats, scoped by `X-Shopify-Shop-Domain`
    /// and `X-Shopify-Topic`.
    ///
    /// One event delivered to several subscriptions of a topic shares its event id, and the
    /// payloads may differ (`include_fields`, API version). Shopify's guide calls these
    /// duplicates, to be skipped: the handler runs once per event, and every other delivery
    /// of it (a retry, or another subscription's, whatever its payload) is replayed the
    /// first answer. The payload is not compared, so a Shopify delivery is never refused with
    /// 409/422: Shopify retries a refused delivery and, after repeated failures, removes the
    /// subscription. (Older guides use `X-Shopify-Webhook-Id`, which is per delivery and not
    /// documented as stable across retries. Use [`KeySource::header`] if you rely on it.)
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_key_source(KeySource::shopify_event());
    /// ```
    pub fn shopify_event() -> Self {
        Self::delivery_header(X_SHOPIFY_EVENT_ID, Delivery::Shopify)
    }

    /// A Standard Webhooks sender: `webhook-id`, the message id that stays the same when a
    /// message is re-sent, or `svix-id`, the same id under Svix's default header names (Clerk,
    /// Resend and other senders built on Svix). `webhook-id` is asked first.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_key_source(KeySource::standard_webhooks());
    /// ```
    pub fn standard_webhooks() -> Self {
        Self::first_of([Self::header(WEBHOOK_ID), Self::header(SVIX_ID)])
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{Method, Request, request::Parts};

    use super::*;
    use crate::key::{KeyError, MAX_KEY_LEN};

    fn head(headers: &[(&str, &[u8])]) -> Parts {
        let mut request = Request::builder().method(Method::POST).uri("/hooks");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    type Found = Result<Option<String>, KeyError>;
    type Headers<'a> = &'a [(&'a str, &'a [u8])];

    fn extract(source: &KeySource, headers: &[(&str, &[u8])], body: &str) -> Found {
        let parts = head(headers);
        let found = source.extract(&parts, &Bytes::copy_from_slice(body.as_bytes()));
        found.map(|key| key.map(|key| key.as_str().to_owned()))
    }

    fn some(key: &str) -> Found {
        Ok(Some(key.to_owned()))
    }

    /// The rows every header source must pass: present, absent, malformed, too long.
    fn header_table(source: &KeySource, name: &str) {
        let long = vec![b'k'; MAX_KEY_LEN + 1];
        let longest = vec![b'k'; MAX_KEY_LEN];
        let guid: &[u8] = b"72d3162e-cc78-11e3-81ab-4c9367dc0958";
        type Row<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, Found);
        let cases: Vec<Row<'_>> = vec![
            (
                "present",
                vec![(name, guid)],
                some("72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ),
            ("absent", vec![("idempotency-key", b"other")], Ok(None)),
            ("empty", vec![(name, b"")], Err(KeyError::Empty)),
            (
                "with a space",
                vec![(name, b"a b")],
                Err(KeyError::InvalidCharacter),
            ),
            (
                "non-ASCII",
                vec![(name, b"caf\xe9")],
                Err(KeyError::InvalidCharacter),
            ),
            (
                "repeated",
                vec![(name, b"a"), (name, b"a")],
                Err(KeyError::Repeated),
            ),
            (
                "too long",
                vec![(name, &long)],
                Err(KeyError::TooLong {
                    len: MAX_KEY_LEN + 1,
                }),
            ),
            (
                "longest",
                vec![(name, &longest)],
                some(std::str::from_utf8(&longest).unwrap()),
            ),
        ];
        for (what, headers, expected) in cases {
            assert_eq!(extract(source, &headers, "{}"), expected, "{name}: {what}");
            // The same answer without the body, where one is possible.
            let parts = head(&headers);
            let early = source.extract_from_headers(&parts.headers);
            let early = early.map(|found| found.map(|key| key.map(|k| k.as_str().to_owned())));
            assert_eq!(early, Some(expected), "{name}: {what}, from the head alone");
        }
        // A body never holds a header source's key.
        assert_eq!(
            extract(source, &[], r#"{"id":"evt_1"}"#),
            Ok(None),
            "{name}: body"
        );
    }

    #[test]
    fn github_deliveries_are_keyed_by_x_github_delivery() {
        header_table(&KeySource::github_delivery(), "x-github-delivery");
    }

    #[test]
    fn shopify_webhooks_are_keyed_by_x_shopify_event_id() {
        header_table(&KeySource::shopify_event(), "x-shopify-event-id");
        let other = [("x-shopify-webhook-id", &b"w-1"[..])];
        assert_eq!(extract(&KeySource::shopify_event(), &other, ""), Ok(None));
    }

    #[test]
    fn standard_webhooks_are_keyed_by_webhook_id() {
        header_table(&KeySource::standard_webhooks(), "webhook-id");
    }

    #[test]
    fn stripe_events_are_keyed_by_their_id() {
        let source = KeySource::stripe_event();
        let long = format!(r#"{{"id":"{}"}}"#, "e".repeat(MAX_KEY_LEN + 1));
        let cases: Vec<(&str, &str, Found)> = vec![
            (
                "present",
                r#"{"id":"evt_1NG8Du2eZvKYlo2C","object":"event"}"#,
                some("evt_1NG8Du2eZvKYlo2C"),
            ),
            (
                "after other members",
                r#"{"object":"event","data":{"object":{"id":"ch_1"}},"id":"evt_2"}"#,
                some("evt_2"),
            ),
            ("absent", r#"{"object":"event"}"#, Ok(None)),
            ("only nested", r#"{"data":{"id":"evt_nested"}}"#, Ok(None)),
            ("null", r#"{"id":null}"#, Ok(None)),
            ("a number", r#"{"id":42}"#, some("42")),
            ("an object", r#"{"id":{"x":1}}"#, Err(KeyError::NotAString)),
            ("empty", r#"{"id":""}"#, Err(KeyError::Empty)),
            (
                "with a space",
                r#"{"id":"evt 1"}"#,
                Err(KeyError::InvalidCharacter),
            ),
            (
                "too long",
                &long,
                Err(KeyError::TooLong {
                    len: MAX_KEY_LEN + 1,
                }),
            ),
            ("not JSON", "id=evt_1", Ok(None)),
            ("an array", r#"[{"id":"evt_1"}]"#, Ok(None)),
            ("empty body", "", Ok(None)),
        ];
        for (what, body, expected) in cases {
            assert_eq!(extract(&source, &[], body), expected, "{what}");
        }
        // The body is needed: no answer from the head alone.
        assert!(source.extract_from_headers(&head(&[]).headers).is_none());
    }

    #[test]
    fn a_nested_pointer_reaches_an_mcp_tool_argument() {
        let source = KeySource::json_pointer("/params/arguments/idempotency_key");
        let call = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"send_email","arguments":{"to":"a@example.com","idempotency_key":"mail-42"}}}"#;
        assert_eq!(extract(&source, &[], call), some("mail-42"));
        let without = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x","arguments":{}}}"#;
        assert_eq!(extract(&source, &[], without), Ok(None));
        assert_eq!(extract(&source, &[], r#"{"params":[1]}"#), Ok(None));
    }

    #[test]
    fn ordered_sources_take_the_first_that_finds_a_key() {
        let source = KeySource::first_of([
            KeySource::standard_webhooks(),
            KeySource::stripe_event(),
            KeySource::github_delivery(),
        ]);
        let both = [
            ("webhook-id", &b"msg_1"[..]),
            ("x-github-delivery", b"gh-1"),
        ];
        let github = [("x-github-delivery", &b"gh-1"[..])];
        let invalid_first = [
            ("webhook-id", &b"bad key"[..]),
            ("x-github-delivery", b"gh-1"),
        ];
        let cases: Vec<(&str, Headers<'_>, &str, Found)> = vec![
            ("first wins", &both, r#"{"id":"evt_1"}"#, some("msg_1")),
            (
                "the body before a later header",
                &github,
                r#"{"id":"evt_1"}"#,
                some("evt_1"),
            ),
            (
                "the last when the others find nothing",
                &github,
                "not json",
                some("gh-1"),
            ),
            ("none", &[], "{}", Ok(None)),
            (
                "an invalid key is refused, not skipped",
                &invalid_first,
                "{}",
                Err(KeyError::InvalidCharacter),
            ),
        ];
        for (what, headers, body, expected) in cases {
            assert_eq!(extract(&source, headers, body), expected, "{what}");
        }
    }

    #[test]
    fn ordered_sources_answer_from_the_head_until_one_needs_the_body() {
        let headers_only =
            KeySource::first_of([KeySource::github_delivery(), KeySource::standard_webhooks()]);
        let key = |found: Option<Result<Option<crate::IdempotencyKey>, KeyError>>| {
            found.map(|found| found.map(|key| key.map(|k| k.as_str().to_owned())))
        };
        let second = head(&[("webhook-id", b"msg_1")]);
        assert_eq!(
            key(headers_only.extract_from_headers(&second.headers)),
            Some(some("msg_1"))
        );
        assert_eq!(
            key(headers_only.extract_from_headers(&head(&[]).headers)),
            Some(Ok(None))
        );
        let body_second =
            KeySource::first_of([KeySource::github_delivery(), KeySource::stripe_event()]);
        let github = head(&[("x-github-delivery", b"gh-1")]);
        assert_eq!(
            key(body_second.extract_from_headers(&github.headers)),
            Some(some("gh-1"))
        );
        assert_eq!(
            key(body_second.extract_from_headers(&head(&[]).headers)),
            None
        );
    }
}
