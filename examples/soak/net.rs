//! The client's requests: whole ones (hyper, one connection each) and cut ones (the request
//! written on a raw socket, the connection dropped before or while the response is read).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tower_idempotency::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

use crate::server::X_ATTEMPT;

/// Longest a whole request may take: a duplicate waits up to 10 s for the first.
const PATIENCE: Duration = Duration::from_secs(15);

/// A `POST /charges`.
pub struct Charge<'a> {
    /// The `Idempotency-Key` value, if any (already quoted for the quoted form).
    pub key: Option<&'a str>,
    pub attempt: &'a str,
    pub body: &'a Bytes,
}

/// What a request got.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// A whole response. `body` is kept for 2xx answers only; `problem` is the last part of
    /// a problem's `type` (`InFlight`, `StoreUnavailable`, …).
    Answer {
        status: u16,
        replayed: bool,
        problem: Option<String>,
        body: Bytes,
    },
    /// The client dropped the connection on purpose.
    Cut,
    /// Connecting, writing or reading failed, or took too long.
    Failed(String),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Answer { status, .. } if (200..300).contains(status))
    }

    /// A label to count outcomes by.
    pub fn label(&self) -> String {
        match self {
            Self::Answer {
                status,
                replayed: true,
                ..
            } => format!("{status} replayed"),
            Self::Answer {
                status,
                problem: Some(kind),
                ..
            } => format!("{status} {kind}"),
            Self::Answer { status, .. } => format!("{status}"),
            Self::Cut => "cut by the client".to_owned(),
            Self::Failed(_) => "connection failed".to_owned(),
        }
    }
}

/// Sends `charge` whole and reads the whole response.
pub async fn send(addr: SocketAddr, charge: &Charge<'_>) -> Outcome {
    match tokio::time::timeout(PATIENCE, exchange(addr, charge)).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(error)) => Outcome::Failed(error.to_string()),
        Err(_) => Outcome::Failed(format!("no response within {PATIENCE:?}")),
    }
}

async fn exchange(addr: SocketAddr, charge: &Charge<'_>) -> Result<Outcome, crate::BoxError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let mut request = Request::post("/charges")
        .header(header::HOST, addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "close")
        .header(X_ATTEMPT, charge.attempt);
    if let Some(key) = charge.key {
        request = request.header(IDEMPOTENCY_KEY, key);
    }
    let response = sender
        .send_request(request.body(Full::new(charge.body.clone()))?)
        .await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    connection.abort();
    let status = parts.status.as_u16();
    let replayed = parts
        .headers
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|value| value == "true");
    let problem = (parts.headers.get(header::CONTENT_TYPE)
        == Some(&http::HeaderValue::from_static("application/problem+json")))
    .then(|| problem_kind(&body));
    let body = if (200..300).contains(&status) {
        body
    } else {
        Bytes::new()
    };
    Ok(Outcome::Answer {
        status,
        replayed,
        problem,
        body,
    })
}

/// The variant name a problem's `type` ends with.
fn problem_kind(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let kind = json["type"].as_str().unwrap_or("unknown");
    kind.rsplit_once("variant.")
        .map_or(kind, |(_, variant)| variant)
        .to_owned()
}

/// How a cut request ends.
#[derive(Clone, Copy, Debug)]
pub enum Cut {
    /// The connection is dropped this long after the request was written.
    AfterSend(Duration),
    /// The connection is dropped once the first bytes of the response arrive.
    WhileReading,
}

/// Writes `charge` whole, then drops the connection as `cut` says.
pub async fn cut(addr: SocketAddr, charge: &Charge<'_>, cut: Cut) -> Outcome {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut head = format!(
            "POST /charges HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n{X_ATTEMPT}: {}\r\n",
            charge.body.len(),
            charge.attempt
        );
        if let Some(key) = charge.key {
            head.push_str(&format!("{IDEMPOTENCY_KEY}: {key}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(charge.body).await?;
        stream.flush().await?;
        match cut {
            Cut::AfterSend(delay) => tokio::time::sleep(delay).await,
            Cut::WhileReading => {
                let mut first = [0; 16];
                let _ = stream.read(&mut first).await?;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(PATIENCE, exchange).await {
        Ok(Ok(())) | Err(_) => Outcome::Cut,
        Ok(Err(error)) => Outcome::Failed(error.to_string()),
    }
}

/// `GET /executions` of an instance: (running now, (order, attempt) per execution).
pub async fn executions(
    addr: SocketAddr,
) -> Result<(usize, Vec<(String, String)>), crate::BoxError> {
    let fetch = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(connection);
        let request = Request::get("/executions")
            .header(header::HOST, addr.to_string())
            .header(header::CONNECTION, "close")
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        connection.abort();
        if !status.is_success() {
            return Err(format!("GET /executions: {status}").into());
        }
        Ok::<_, crate::BoxError>(body)
    };
    let body = tokio::time::timeout(PATIENCE, fetch)
        .await
        .map_err(|_| "GET /executions timed out")??;
    let text = std::str::from_utf8(&body)?;
    let mut lines = text.lines();
    let running = lines
        .next()
        .and_then(|line| line.strip_prefix("running "))
        .and_then(|n| n.parse().ok())
        .ok_or("GET /executions: no running count")?;
    let executions = lines
        .filter_map(|line| line.split_once(' '))
        .map(|(order, attempt)| (order.to_owned(), attempt.to_owned()))
        .collect();
    Ok((running, executions))
}
