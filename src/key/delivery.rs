//! [`Delivery`]: what a webhook provider's delivery id means beyond the id. Which headers tell
//! the subscribers of one event apart (part of the record's address), and whether their
//! payloads may differ under one id.
//!
//! Pure logic: no tower or tokio in here.

use http::{HeaderMap, HeaderName};

use crate::fingerprint::digest::FieldHasher;

/// What tells GitHub's subscribers of one event apart: the hook, and the resource it was
/// created on (a repository, an organisation, an App).
static GITHUB_SUBSCRIBER: [HeaderName; 3] = [
    HeaderName::from_static("x-github-hook-id"),
    HeaderName::from_static("x-github-hook-installation-target-type"),
    HeaderName::from_static("x-github-hook-installation-target-id"),
];

/// What tells Shopify's deliveries of one event apart where the handling may differ: the shop
/// and the topic. Subscriptions of one topic are not told apart: Shopify's guide to duplicate
/// webhooks calls their deliveries of one event duplicates, to be skipped.
static SHOPIFY_SUBSCRIBER: [HeaderName; 2] = [
    HeaderName::from_static("x-shopify-shop-domain"),
    HeaderName::from_static("x-shopify-topic"),
];

/// What a key found by a key source means beyond the key itself: which headers tell the
/// subscribers of one event apart (part of the record's address), and whether a payload
/// difference under one key is a key reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Delivery {
    /// The key alone; another payload under it is a key reuse (409 or 422).
    #[default]
    Plain,
    /// A GitHub delivery: scoped by its hook. A redelivery repeats its payload.
    GitHub,
    /// A Shopify event: scoped by shop and topic; its payload is not compared, because each
    /// subscription may shape it differently (`include_fields`, API version) and Shopify
    /// retries, then removes, a subscription answered with an error.
    Shopify,
}

impl Delivery {
    /// The headers that tell two subscribers of one event apart.
    fn subscriber(self) -> &'static [HeaderName] {
        match self {
            Self::Plain => &[],
            Self::GitHub => &GITHUB_SUBSCRIBER,
            Self::Shopify => &SHOPIFY_SUBSCRIBER,
        }
    }

    /// Whether two deliveries under one key must carry the same payload.
    pub(crate) fn compares_payload(self) -> bool {
        !matches!(self, Self::Shopify)
    }

    /// Adds the subscriber's headers, those present, to a storage key.
    pub(crate) fn hash(self, headers: &HeaderMap, hasher: &mut FieldHasher) {
        for name in self.subscriber() {
            for value in &headers.get_all(name) {
                hasher.field(b'w', name.as_str().as_bytes());
                hasher.field(b'v', value.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    #[test]
    fn subscriber_headers_and_payload_rules_table() {
        let head = |headers: &[(&str, &str)]| {
            let mut request = Request::post("/hooks");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.body(()).unwrap().into_parts().0.headers
        };
        let digest = |delivery: Delivery, headers: &HeaderMap| {
            let mut hasher = FieldHasher::new();
            delivery.hash(headers, &mut hasher);
            hasher.finish()
        };
        let hook_1 = head(&[
            ("x-github-hook-id", "1"),
            ("x-shopify-topic", "orders/create"),
        ]);
        let hook_2 = head(&[
            ("x-github-hook-id", "2"),
            ("x-shopify-topic", "orders/create"),
        ]);
        let target = head(&[
            ("x-github-hook-id", "1"),
            ("x-github-hook-installation-target-id", "9"),
        ]);
        let topic = head(&[
            ("x-github-hook-id", "1"),
            ("x-shopify-topic", "orders/paid"),
        ]);
        // (delivery, two heads, told apart, payload compared)
        let cases = [
            (Delivery::Plain, &hook_1, &hook_2, false, true),
            (Delivery::GitHub, &hook_1, &hook_2, true, true),
            (Delivery::GitHub, &hook_1, &target, true, true),
            (Delivery::GitHub, &hook_1, &topic, false, true),
            (Delivery::Shopify, &hook_1, &hook_2, false, false),
            (Delivery::Shopify, &hook_1, &topic, true, false),
        ];
        for (delivery, a, b, apart, compared) in cases {
            let what = format!("{delivery:?}: {a:?} / {b:?}");
            assert_eq!(digest(delivery, a) != digest(delivery, b), apart, "{what}");
            assert_eq!(delivery.compares_payload(), compared, "{what}");
        }
    }
}
