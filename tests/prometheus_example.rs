//! `examples/prometheus.rs` served over real HTTP on a loopback port, and scraped: the
//! layer's metrics reach Prometheus's text format with their route label.
#![cfg(all(feature = "metrics", feature = "axum", feature = "moka"))]

#[allow(dead_code)]
#[path = "../examples/prometheus.rs"]
mod example;

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower_idempotency::MemoryStore;

/// One HTTP/1.1 exchange on a fresh connection; the whole response as text.
async fn http(port: u16, request: &str) -> String {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("the server answers")
        .expect("the exchange")
}

fn charge(key: &str) -> String {
    let body = r#"{"amount":100}"#;
    format!(
        "POST /charges HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Idempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The value of the sample `line_start …` in a Prometheus text page.
fn sample(page: &str, line_start: &str) -> Option<f64> {
    page.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_exposes_the_layers_metrics_to_a_prometheus_scrape() {
    let metrics = example::install_recorder();
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let token = Some("test-token".to_owned());
        axum::serve(
            listener,
            example::app(metrics, MemoryStore::default(), token),
        )
        .await
    });

    let first = http(port, &charge("scrape-1")).await;
    assert!(first.starts_with("HTTP/1.1 201"), "{first}");
    let replay = http(port, &charge("scrape-1")).await;
    assert!(
        replay
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{replay}"
    );

    let page = http(
        port,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for (line, value) in [
        (
            r#"idempotency_requests_total{route="charges",outcome="executed"}"#,
            1.0,
        ),
        (
            r#"idempotency_requests_total{route="charges",outcome="replayed"}"#,
            1.0,
        ),
        (
            r#"idempotency_records_total{route="charges",result="stored"}"#,
            1.0,
        ),
        (
            r#"idempotency_store_duration_seconds_count{route="charges",store="memory",op="claim"}"#,
            2.0,
        ),
    ] {
        assert_eq!(sample(&page, line), Some(value), "{line} in:\n{page}");
    }
    assert!(
        page.contains(r#"idempotency_store_duration_seconds_bucket{route="charges",store="memory",op="claim",le="0.001"}"#),
        "latency is a histogram with buckets, for p99 across instances:\n{page}"
    );
    assert!(!page.contains("scrape-1"), "no key in any label");

    let admin = |authorization: &str| {
        format!(
            "GET /admin/claims?older_than=0 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{authorization}\r\n"
        )
    };
    let claims = http(port, &admin("Authorization: Bearer test-token\r\n")).await;
    assert!(claims.starts_with("HTTP/1.1 200"), "{claims}");
    assert!(claims.contains(r#""claims":[]"#), "{claims}");
    for refused in [
        "",
        "Authorization: Bearer wrong-token\r\n",
        "Authorization: Bearer \r\n",
    ] {
        let reply = http(port, &admin(refused)).await;
        assert!(reply.starts_with("HTTP/1.1 401"), "{refused:?}: {reply}");
    }
    server.abort();
}
