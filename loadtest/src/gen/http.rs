//! The generator's HTTP client: one HTTP/1.1 keep-alive connection per worker, requests sent
//! one after the other on it (hyper's connection-level API; a pooling client would add
//! nothing here, since each worker owns its connection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::smtp::ErrorClass;

/// Where and how to inject over the SendGrid v3 API.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    /// The API key sent as `Authorization: Bearer`.
    pub api_key: String,
    /// Personalizations (messages) per request.
    pub personalizations: u32,
    /// Limit of every network wait (connect, and each request with its response).
    pub timeout: Duration,
}

pub struct HttpSender {
    target: Arc<HttpTarget>,
    host: String,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl HttpSender {
    pub fn new(target: Arc<HttpTarget>) -> HttpSender {
        HttpSender { host: target.addr.to_string(), target, conn: None }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ErrorClass> {
        let limit = self.target.timeout;
        let tcp = tokio::time::timeout(limit, TcpStream::connect(self.target.addr))
            .await
            .map_err(|_| "timeout at connect".to_string())?
            .map_err(|e| format!("connect: {}", e.kind().to_string().to_lowercase()))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = tokio::time::timeout(limit, hyper::client::conn::http1::handshake(TokioIo::new(tcp)))
            .await
            .map_err(|_| "timeout at connect".to_string())?
            .map_err(|e| format!("http handshake: {e}"))?;
        // The connection task ends when the sender is dropped or the server closes.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// POSTs one `/v3/mail/send` request; `Ok` on 202.
    pub async fn send(&mut self, body: Bytes) -> Result<(), ErrorClass> {
        let mut sender = match self.conn.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        let limit = self.target.timeout;
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v3/mail/send")
            .header(HOST, &self.host)
            .header(AUTHORIZATION, format!("Bearer {}", self.target.api_key))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let exchange = async {
            sender.ready().await.map_err(|e| format!("http: {e}"))?;
            let response = sender.send_request(request).await.map_err(|e| format!("http: {}", short(&e.to_string())))?;
            let status = response.status();
            // Read the whole body so the connection can carry the next request.
            let body = response.into_body().collect().await.map_err(|e| format!("http body: {e}"))?.to_bytes();
            Ok::<_, ErrorClass>((status, body))
        };
        let (status, body) = tokio::time::timeout(limit, exchange).await.map_err(|_| "timeout at http request".to_string())??;
        self.conn = Some(sender);
        if status == StatusCode::ACCEPTED {
            return Ok(());
        }
        Err(match status.as_u16() {
            400..=499 => format!("http {} {}", status.as_u16(), first_error(&body)),
            code => format!("http {code}"),
        })
    }
}

/// The first `errors[].message` of a SendGrid error body, shortened, for the breakdown.
fn first_error(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["errors"][0]["message"].as_str().map(short))
        .unwrap_or_default()
}

fn short(s: &str) -> String {
    let mut s = s.trim().to_string();
    if s.len() > 80 {
        let mut cut = 80;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_give_short_classes() {
        let body = br#"{"errors":[{"message":"The provided authorization grant is invalid, expired, or revoked","field":null}]}"#;
        assert_eq!(first_error(body), "The provided authorization grant is invalid, expired, or revoked");
        assert_eq!(first_error(b"<html>413</html>"), "");
        assert_eq!(short(&"x".repeat(100)).chars().count(), 81);
    }
}
