//! The body types the layer hands on: [`RequestBody`] to the inner service and
//! [`ResponseBody`] to the client.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll, ready},
};

pub(crate) use crate::flow::chunks::Chunks;
use crate::{flow::stream::Receiver, problem::Problem, store::error::BoxError};
use bytes::Bytes;
use http::{HeaderMap, header, request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The request body the inner service receives: the original body, untouched, for
    /// requests the layer lets through; the bytes it read (and fingerprinted) otherwise; or,
    /// for a request without a key whose body outgrew the limit while being read, the bytes
    /// read so far followed by the rest of the original body.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
        Resumed { read: std::vec::IntoIter<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> RequestBody<B> {
    /// Wraps a body the layer did not read.
    pub fn new(body: B) -> Self {
        Self {
            kind: RequestKind::Inner { body },
        }
    }

    /// A body of bytes the layer already read.
    pub fn full(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            kind: RequestKind::Full { data },
        }
    }

    /// The chunks the layer read, then the rest of the body they came from.
    pub(crate) fn resumed(read: Chunks, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: RequestKind::Resumed {
                read: read.into_vec().into_iter(),
                rest,
            },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            RequestKindProj::Full { data } => {
                Poll::Ready(data.take().map(|data| Ok(Frame::data(data))))
            }
            RequestKindProj::Resumed { read, rest } => match read.next() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => rest.as_mut().poll_frame(cx).map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Inner { body } => body.is_end_stream(),
            RequestKind::Full { data } => data.is_none(),
            RequestKind::Resumed { read, rest } => read.len() == 0 && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Inner { body } => body.size_hint(),
            RequestKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Resumed { read, rest } => {
                let read = read.as_slice().iter().map(|d| d.len() as u64).sum::<u64>();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(read));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(read));
                }
                hint
            }
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Inner { .. } => f.write_str("RequestBody::Inner"),
            RequestKind::Full { data } => f
                .debug_struct("RequestBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            RequestKind::Resumed { read, .. } => f
                .debug_struct("RequestBody::Resumed")
                .field("chunks_read", &read.len())
                .finish(),
        }
    }
}

/// Whether a request body may be longer than `limit`: it declares no length within it.
pub(crate) fn may_exceed<B: Body>(headers: &HeaderMap, body: &B, limit: usize) -> bool {
    let max = limit as u64;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    declared.is_some_and(|len| len > max) || body.size_hint().upper().is_none_or(|len| len > max)
}

/// Reads a request body whole into `read`, refusing it past `limit`: by its declared length
/// before anything is read (an oversized upload is refused without reading it), then as it
/// arrives.
pub(crate) fn poll_read<B>(
    body: Pin<&mut B>,
    read: &mut Chunks,
    head: &request::Parts,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Problem>>
where
    B: Body<Data = Bytes>,
{
    if read.is_empty() {
        let declared = head
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let max = limit as u64;
        if declared.is_some_and(|len| len > max) || body.size_hint().lower() > max {
            return Poll::Ready(Err(Problem::body_too_large(limit)));
        }
    }
    poll_read_limited(body, read, limit, cx)
}

/// Reads a body whole into `read`, refusing it past `limit`.
pub(crate) fn poll_read_limited<B>(
    mut body: Pin<&mut B>,
    read: &mut Chunks,
    limit: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Problem>>
where
    B: Body<Data = Bytes>,
{
    while let Some(frame) = ready!(body.as_mut().poll_frame(cx)) {
        let Ok(frame) = frame else {
            return Poll::Ready(Err(Problem::unreadable_body()));
        };
        if let Ok(data) = frame.into_data() {
            // The chunk that crosses the limit is kept: a request without a key hands every
            // chunk read on to its handler (it is in memory already; nothing more is read).
            read.push(data);
            if read.len > limit {
                return Poll::Ready(Err(Problem::body_too_large(limit)));
            }
        }
    }
    Poll::Ready(Ok(()))
}

pin_project! {
    /// The response body the client receives: the inner body untouched (pass-through), a
    /// replayed or problem body from memory, or the first response streamed from the task
    /// that runs the handler while it is captured.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Channel { rx: Receiver },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            kind: ResponseKind::Full { data, trailers },
        }
    }

    pub(crate) fn channel(rx: Receiver) -> Self {
        Self {
            kind: ResponseKind::Channel { rx },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ResponseKindProj::Channel { rx } => rx.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Channel { rx } => rx.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Channel { .. } => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ResponseKind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            ResponseKind::Full { data, .. } => f
                .debug_struct("ResponseBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            ResponseKind::Channel { rx } => f
                .debug_struct("ResponseBody::Channel")
                .field("done", &rx.is_end_stream())
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};

    type Plain = Empty<Bytes>;

    #[tokio::test]
    async fn a_full_body_yields_its_data_then_its_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        let body = ResponseBody::<Plain>::full(Bytes::from_static(b"abc"), Some(trailers.clone()));
        assert_eq!(body.size_hint().exact(), Some(3));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "abc");
    }

    #[tokio::test]
    async fn an_empty_full_body_is_at_its_end() {
        let body = ResponseBody::<Plain>::full(Bytes::new(), None);
        assert!(body.is_end_stream());
        let request = RequestBody::<Plain>::full(Bytes::new());
        assert!(request.is_end_stream());
    }

    fn captured(data: &'static [u8]) -> Chunks {
        let mut chunks = Chunks::default();
        chunks.push(Bytes::from_static(data));
        chunks
    }

    #[tokio::test]
    async fn a_channel_that_closes_without_end_is_an_error() {
        let (tx, rx) = crate::flow::stream::channel(captured(b"part"));
        drop(tx);
        let mut body = ResponseBody::<Plain>::channel(rx);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        assert!(body.frame().await.unwrap().is_err());
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_channel_that_ends_is_a_complete_body() {
        let (tx, rx) = crate::flow::stream::channel(captured(b"a"));
        tx.capture(Bytes::from_static(b"b"));
        tx.end();
        let body = ResponseBody::<Plain>::channel(rx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");
    }

    #[tokio::test]
    async fn a_resumed_body_yields_what_was_read_then_the_rest() {
        let mut read = Chunks::default();
        read.push(Bytes::from_static(b"ab"));
        read.push(Bytes::from_static(b"cd"));
        let rest = Box::pin(Full::new(Bytes::from_static(b"ef")));
        let body = RequestBody::resumed(read, rest);
        assert_eq!(body.size_hint().exact(), Some(6));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdef");
        let nothing_read = RequestBody::resumed(Chunks::default(), Box::pin(Plain::new()));
        assert!(nothing_read.is_end_stream());
    }

    #[test]
    fn a_body_may_exceed_the_limit_unless_its_length_says_otherwise() {
        let headers = |length: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(length) = length {
                headers.insert(header::CONTENT_LENGTH, length.parse().unwrap());
            }
            headers
        };
        let sized = |len: usize| Full::new(Bytes::from(vec![0; len]));
        let unsized_body = Unsized;
        let cases = [
            (
                "exact, within",
                may_exceed(&headers(None), &sized(10), 10),
                false,
            ),
            (
                "exact, over",
                may_exceed(&headers(None), &sized(11), 10),
                true,
            ),
            (
                "declared over",
                may_exceed(&headers(Some("11")), &sized(10), 10),
                true,
            ),
            (
                "declared within",
                may_exceed(&headers(Some("10")), &sized(10), 10),
                false,
            ),
            (
                "no upper bound",
                may_exceed(&headers(None), &unsized_body, 10),
                true,
            ),
        ];
        for (what, got, expected) in cases {
            assert_eq!(got, expected, "{what}");
        }
    }

    /// A body of no known length.
    struct Unsized;

    impl Body for Unsized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }
    }

    #[tokio::test]
    async fn inner_bodies_pass_through_unchanged() {
        let body = ResponseBody::inner(Full::new(Bytes::from_static(b"inner")));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "inner");
        let request = RequestBody::new(Full::new(Bytes::from_static(b"req")));
        assert_eq!(request.collect().await.unwrap().to_bytes(), "req");
    }
}
