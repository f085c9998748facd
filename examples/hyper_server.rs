//! The webhook endpoint on plain hyper 1 — no framework, no crate feature.
//!
//! ```text
//! STRIPE_WEBHOOK_SECRET=whsec_... cargo run --example hyper_server
//! stripe listen --forward-to localhost:4242/webhooks/stripe
//! ```
//!
//! All the processor needs from any HTTP stack is the raw body bytes and the
//! `Stripe-Signature` header; it answers with the status to send back
//! (200 settled, 400 bad delivery, 413 too large, 5xx so that Stripe retries).
//! In-memory store; `BIND` defaults to `127.0.0.1:4242`.
//!
//! Ctrl-C stops accepting, gives the connections in progress 10 seconds,
//! then drops them and gives back the claims their work still held
//! ([`WebhookProcessor::release_held`]), so that Stripe's retry is
//! processed at once by the next instance instead of waiting for the lease.
//! A header-read timeout (10 s) closes connections whose request head
//! stalls.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use stripe_webhook_guard::processor::WebhookProcessor;
use stripe_webhook_guard::signature::Verifier;
use stripe_webhook_guard::store::MemoryStore;
use tokio::net::TcpListener;

async fn webhook(
    processor: WebhookProcessor,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != "/webhooks/stripe" {
        return Ok(reply(404, &json!({ "error": "not_found" })));
    }
    // The header: absent or not UTF-8 counts as missing.
    let signature = request
        .headers()
        .get("stripe-signature")
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .map(str::to_owned);
    // The raw body, never more than the verifier will hash.
    let limit = processor.verifier().body_limit();
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Ok(reply(
                413,
                &json!({ "error": "body_too_large", "retryable": false }),
            ));
        }
        Err(_) => {
            return Ok(reply(
                400,
                &json!({ "error": "unreadable_body", "retryable": true }),
            ));
        }
    };

    let (status, answer) = match processor.handle(&body, signature.as_deref()).await {
        Ok(outcome) => {
            println!(
                "{} {} -> {}",
                outcome.event_id(),
                outcome.as_str(),
                outcome.http_status()
            );
            (
                outcome.http_status(),
                json!({ "outcome": outcome.as_str(), "event_id": outcome.event_id() }),
            )
        }
        Err(error) => {
            // `Error` never contains the body, the header or a secret.
            eprintln!("refused: {error} -> {}", error.http_status());
            (
                error.http_status(),
                json!({ "error": error.as_str(), "retryable": error.is_retryable() }),
            )
        }
    };
    Ok(reply(status, &answer))
}

fn reply(status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("STRIPE_WEBHOOK_SECRET")
        .map_err(|_| "set STRIPE_WEBHOOK_SECRET to the endpoint's whsec_… signing secret")?;
    let bind: SocketAddr = std::env::var("BIND")
        .unwrap_or_else(|_| "127.0.0.1:4242".to_owned())
        .parse()?;

    let processor = WebhookProcessor::builder(Verifier::new(secret.trim()))
        .store(Arc::new(MemoryStore::new()))
        .build();

    let listener = TcpListener::bind(bind).await?;
    println!(
        "listening on http://{}/webhooks/stripe",
        listener.local_addr()?
    );
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => break,
        };
        while connections.try_join_next().is_some() {}
        let processor = processor.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| webhook(processor.clone(), request));
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {e}");
            }
        });
    }
    // Stop accepting; let requests in progress finish, up to a deadline.
    drop(listener);
    let deadline = Duration::from_secs(10);
    if tokio::time::timeout(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.shutdown().await;
    }
    // Work cut off mid-event: give its claims back.
    let released = processor.release_held().await?;
    println!("released {released} claims");
    println!("stats: {:?}", processor.stats());
    Ok(())
}
