//! The body types the layer hands on: [`RequestBody`] to the inner service and
//! [`ResponseBody`] to the client.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll, ready},
};

pub(crate) use crate::chunks::Chunks;
use crate::{error::BoxError, problem::Problem, stream::Receiver};
use bytes::Bytes;
use http::{HeaderMap, header, request};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The request body the inner service receives: the original body, untouched, for
    /// requests the layer lets through; the bytes it read (and fingerprinted) otherwise.
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Inner { body } => body.is_end_stream(),
            RequestKind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Inner { body } => body.size_hint(),
            RequestKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
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
        }
    }
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
            if read.len + data.len() > limit {
                return Poll::Ready(Err(Problem::body_too_large(limit)));
            }
            read.push(data);
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
        let (tx, rx) = crate::stream::channel(captured(b"part"));
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
        let (tx, rx) = crate::stream::channel(captured(b"a"));
        tx.capture(Bytes::from_static(b"b"));
        tx.end();
        let body = ResponseBody::<Plain>::channel(rx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ab");
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
