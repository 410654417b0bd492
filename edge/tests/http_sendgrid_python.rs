//! Interop with the official SendGrid Python SDK (PyPI `sendgrid`): the SDK, pointed at
//! sluice by its `host` argument only, sends mail, gets `UnauthorizedError` for an unknown
//! key and `BadRequestsError` with SendGrid-shaped errors for an invalid body. The scripts
//! live in `tests/python/`.

mod http_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use http_support::{Harness, KEY};
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::Value;
use sluice_edge::http::{serve, UNAUTHORIZED_MESSAGE};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PDF: &[u8] = b"%PDF-1.4 sluice interop \x00\x01\x02\xff";
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n sluice logo";

/// Fails (never skips) when the SDK is missing: a silently skipped interop test proves nothing.
fn require_python_sdk() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import sendgrid, python_http_client"])
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "this test needs the official SendGrid SDK for Python, and `import sendgrid` failed:\n{}\n\
             Run the project's test command (bash .ci/run), which installs it, or `python3 -m pip install sendgrid`.",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "this test needs python3 with the `sendgrid` package, and python3 could not be run ({e}). \
             Run the project's test command (bash .ci/run), which installs both."
        ),
    }
}

struct Server {
    harness: Harness,
    addr: SocketAddr,
    cancel: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Server {
        require_python_sdk();
        let harness = Harness::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, harness.edge.clone(), cancel.clone()));
        Server { harness, addr, cancel, task }
    }

    /// Runs `sendgrid_client.py MODE` against this server; returns what it printed.
    async fn python(&self, mode: &str, key: &str) -> Value {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/sendgrid_client.py");
        let run = tokio::process::Command::new("python3")
            .arg(&script)
            .arg(mode)
            .args(["--port", &self.addr.port().to_string(), "--key", key])
            // The SDK honours proxy variables; the server is local.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("{} {mode} did not finish", script.display()))
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode} failed ({}):\nstdout: {stdout}\nstderr: {stderr}", out.status);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{mode} printed no JSON ({e}): {stdout}\n{stderr}"))
    }

    async fn stop(self) -> Harness {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.expect("serve stops").unwrap().unwrap();
        self.harness
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_sends_attachments_cc_bcc_and_substitutions() {
    let server = Server::start().await;
    let result = server.python("send", KEY).await;
    let h = server.stop().await;

    assert_eq!(result["status"], 202, "{result}");
    assert_eq!(result["body"], "");
    let x_message_id = result["x_message_id"].as_str().expect("X-Message-Id header reaches the SDK");

    // Ada's personalization (to + cc + bcc) is split over two domains; Bob's is one message.
    let messages = h.enqueued();
    assert_eq!(messages.len(), 3, "{:#?}", messages.iter().map(|m| &m.meta).collect::<Vec<_>>());
    for m in &messages {
        assert_eq!(m.meta.x_message_id, x_message_id);
        assert_eq!(m.meta.tenant, "apikey:acme");
        assert_eq!(m.meta.mail_from, "sender@example.org");
        assert_eq!(m.meta.categories, ["interop"]);
        assert_eq!(m.meta.custom_args.get("run").map(String::as_str), Some("python"));
    }
    let rcpts = |m: &sluice_spool::Message| m.meta.recipients.iter().map(|r| r.address.clone()).collect::<Vec<_>>();
    let ada = messages.iter().find(|m| m.meta.queue == "example.com" && rcpts(m).contains(&"ada@example.com".into())).unwrap();
    assert_eq!(rcpts(ada), ["ada@example.com", "hidden@example.com"]);
    let cc = messages.iter().find(|m| m.meta.queue == "example.net").unwrap();
    assert_eq!(rcpts(cc), ["cc@example.net"]);
    assert_eq!(cc.body, ada.body, "the parts of one personalization share its message");
    let bob = messages.iter().find(|m| rcpts(m) == ["bob@example.com"]).unwrap();

    let msg = MessageParser::default().parse(&ada.body[..]).unwrap();
    assert_eq!(msg.subject(), Some("Hello Ada"));
    assert_eq!(msg.from().unwrap().first().unwrap().name(), Some("Sluice Interop"));
    assert_eq!(msg.cc().unwrap().first().unwrap().address(), Some("cc@example.net"));
    assert!(msg.bcc().is_none());
    assert!(!String::from_utf8_lossy(&ada.body).contains("hidden@"), "bcc never appears in the message");
    assert_eq!(msg.header_raw("X-Interop").map(str::trim), Some("sendgrid-python"));
    assert_eq!(msg.body_text(0).unwrap().trim_end(), "Dear Ada, your code is A1.");
    assert!(msg.body_html(0).unwrap().contains("<b>A1</b>"));
    let invoice = msg.attachments().find(|a| a.attachment_name() == Some("invoice.pdf")).expect("invoice.pdf attached");
    assert_eq!(invoice.contents(), PDF);
    let logo = msg.attachments().find(|a| a.content_id() == Some("logo")).expect("inline logo");
    assert_eq!(logo.contents(), PNG);
    assert_eq!(
        http_support::structure(&ada.body),
        "multipart/mixed[multipart/related[multipart/alternative[text/plain,text/html],image/png],application/pdf]"
    );

    let msg = MessageParser::default().parse(&bob.body[..]).unwrap();
    assert_eq!(msg.subject(), Some("Hello Bob"));
    assert_eq!(msg.body_text(0).unwrap().trim_end(), "Dear Bob, your code is B2.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_raises_unauthorized_for_an_unknown_key() {
    let server = Server::start().await;
    let result = server.python("bad-key", "SG.not-a-configured-key").await;
    let h = server.stop().await;
    assert_eq!(result["status"], 401);
    assert_eq!(result["body"], serde_json::json!({"errors": [{"message": UNAUTHORIZED_MESSAGE, "field": null, "help": null}]}));
    assert!(h.enqueued().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_raises_bad_request_with_sendgrid_shaped_errors() {
    let server = Server::start().await;
    let result = server.python("invalid", KEY).await;
    let h = server.stop().await;
    assert_eq!(result["status"], 400);
    let errors = result["body"]["errors"].as_array().expect("errors array");
    let on = |field: &str| {
        errors
            .iter()
            .find(|e| e["field"] == field)
            .unwrap_or_else(|| panic!("no error on {field}: {errors:#?}"))["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(on("personalizations.0.to.0.email").starts_with("Does not contain a valid address"));
    assert_eq!(
        on("personalizations.1.to"),
        "The to array is required for all personalization objects, and must have at least one email object with a valid email address."
    );
    assert!(on("subject").starts_with("The subject is required"));
    assert!(errors.iter().all(|e| e.get("help").is_some()));
    assert!(h.enqueued().is_empty());
}
