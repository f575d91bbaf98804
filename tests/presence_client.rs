//! The rendezvous client against small local HTTP servers: conditional GET, bearer token, the body cap
//! enforced while streaming, timeouts and refused connections.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use mesh_operator::presence::{FetchError, Fetched, Fetcher, Request};

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/presence")
}

fn request(url: &str) -> Request<'_> {
    Request { url, token: None, ca_bundle: None, timeout: Duration::from_secs(2), etag: None, wait: None }
}

const BODY: &str = r#"{"serverNodeId":"rv","nowMs":1000,"nodes":[{"node_id":"aa","address":"ws://0.0.0.0:1/","alive":true,"last_seen_ms":999}]}"#;

#[tokio::test]
async fn conditional_get_and_bearer_token() {
    // (Authorization, If-None-Match) of each request.
    type Seen = Vec<(Option<String>, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let log = seen.clone();
    let app = Router::new().route(
        "/presence",
        get(move |headers: HeaderMap| {
            let log = log.clone();
            async move {
                let h = |k: header::HeaderName| headers.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
                log.lock().unwrap().push((h(header::AUTHORIZATION), h(header::IF_NONE_MATCH)));
                if h(header::IF_NONE_MATCH).as_deref() == Some("\"v1\"") {
                    return StatusCode::NOT_MODIFIED.into_response();
                }
                ([(header::ETAG, "\"v1\"")], BODY).into_response()
            }
        }),
    );
    let url = serve(app).await;
    let fetcher = Fetcher::new(1 << 20);
    let mut req = request(&url);
    req.token = Some("t0k");
    let Fetched::New { snapshot, etag, bytes, .. } = fetcher.fetch(&req).await.unwrap() else {
        panic!("expected a body")
    };
    assert_eq!((snapshot.nodes.len(), etag.as_deref(), bytes), (1, Some("\"v1\""), BODY.len()));
    req.etag = etag.as_deref();
    assert!(matches!(fetcher.fetch(&req).await.unwrap(), Fetched::NotModified { .. }));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], (Some("Bearer t0k".into()), None));
    assert_eq!(seen[1], (Some("Bearer t0k".into()), Some("\"v1\"".into())));
}

#[tokio::test]
async fn oversized_bodies_are_cut_off_while_streaming() {
    // No Content-Length: the cap must hold while reading, not just on the header.
    let app = Router::new().route(
        "/presence",
        get(|| async {
            let chunk = axum::body::Bytes::from(vec![b' '; 64 * 1024]);
            Body::from_stream(futures::stream::iter((0..1024).map(move |_| Ok::<_, std::io::Error>(chunk.clone()))))
        }),
    );
    let url = serve(app).await;
    let err = Fetcher::new(256 * 1024).fetch(&request(&url)).await.err().expect("a too-large error");
    assert!(matches!(err, FetchError::TooLarge { limit: 262144 }), "{err}");
    assert_eq!(err.reason(), "BodyTooLarge");
}

#[tokio::test]
async fn failures_have_their_reasons() {
    let app = Router::new()
        .route("/presence", get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route("/garbage", get(|| async { "[{\"node_id\": 7}]" }));
    let url = serve(app).await;
    let fetcher = Fetcher::new(1 << 20);
    let status = fetcher.fetch(&request(&url)).await.err().unwrap();
    assert_eq!((status.reason(), status.to_string()), ("HTTPStatus", "HTTP status 503".into()));
    let slow_url = url.replace("/presence", "/slow");
    let mut slow = request(&slow_url);
    slow.timeout = Duration::from_millis(300);
    assert_eq!(fetcher.fetch(&slow).await.err().unwrap().reason(), "Timeout");
    let garbage_url = url.replace("/presence", "/garbage");
    let garbage = fetcher.fetch(&request(&garbage_url)).await.err().unwrap();
    assert_eq!(garbage.reason(), "MalformedBody");
    assert!(garbage.to_string().contains("line 1 column"), "{garbage}");
    // Nothing listens on port 1.
    let refused = fetcher.fetch(&request("http://127.0.0.1:1/presence")).await.err().unwrap();
    assert_eq!(refused.reason(), "ConnectionFailed", "{refused}");
    let bad_ca = Request { ca_bundle: Some("not pem"), ..request(&url) };
    assert_eq!(fetcher.fetch(&bad_ca).await.err().unwrap().reason(), "CABundleUnavailable");
}
