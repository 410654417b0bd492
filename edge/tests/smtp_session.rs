//! Raw-socket sessions against the SMTP relay: every reply code the relay gives, pipelining,
//! limits, relay policy, AUTH, STARTTLS, smuggling, and what ends up in the spool.

mod smtp_support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sluice_edge::smtp::SmtpConfig;
use sluice_spool::{Lease, LeaseRequest, Leased, Message, MessageId, MessageMeta, Spool, SpoolCounts, SpoolError};
use smtp_support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

fn plain(user: &str, password: &str) -> String {
    BASE64.encode(format!("\0{user}\0{password}"))
}

#[tokio::test]
async fn ehlo_advertises_extensions_and_hides_auth_before_tls() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    let ehlo = c.cmd("EHLO client.test").await;
    let lines: Vec<&str> = ehlo.lines().map(|l| &l[4..]).collect();
    assert!(ehlo.starts_with("250-relay.test Hello client.test [127.0.0.1]\n"), "{ehlo}");
    for capability in ["PIPELINING", "SIZE 31457280", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "STARTTLS"] {
        assert!(lines.contains(&capability), "{capability} missing from {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    // HELO works too, with a one-line reply.
    assert_code(&c.cmd("HELO client.test").await, "250 2.0.0 relay.test");
    assert_code(&c.cmd("QUIT").await, "221 2.0.0");
    c.expect_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn relays_from_an_allowed_network_with_trace_headers() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let reply = c.send_message("app@example.org", &["someone@example.net"], &sample_message("hello")).await;
    assert_code(&reply, "250 2.0.0 Ok: queued as ");
    let queue_id = reply.rsplit(' ').next().unwrap().to_string();
    assert_code(&c.cmd("QUIT").await, "221");

    let messages = server.messages().await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.meta.tenant, "net:127.0.0.1");
    assert_eq!(m.meta.mail_from, "app@example.org");
    assert_eq!(m.meta.recipients[0].address, "someone@example.net");
    assert_eq!(m.meta.queue, "example.net");
    assert_eq!(m.meta.x_message_id, queue_id);
    let body = body_text(m);
    let received = header(m, "Received").unwrap();
    assert!(received.starts_with("from client.test ([127.0.0.1])"), "{received}");
    assert!(received.contains(&format!("by relay.test (sluice) with ESMTP id {queue_id}")), "{received}");
    assert!(received.contains("for <someone@example.net>;"), "{received}");
    assert!(body.starts_with("Received: "), "the trace header comes first");
    // Message-ID and Date were missing, so the relay added them; smtp_id is the Message-ID.
    assert_eq!(header(m, "Message-ID").unwrap(), format!("<{queue_id}@relay.test>"));
    assert_eq!(m.meta.smtp_id, format!("<{queue_id}@relay.test>"));
    assert!(header(m, "Date").is_some());
    assert!(body.ends_with("Subject: hello\r\n\r\nHello from the test.\r\n"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.send("EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.com>\r\nRCPT TO:<bad>\r\nDATA\r\n").await;
    assert_code(&c.reply().await, "250-relay.test");
    assert_code(&c.reply().await, "250 2.1.0");
    assert_code(&c.reply().await, "250 2.1.5");
    assert_code(&c.reply().await, "250 2.1.5");
    assert_code(&c.reply().await, "501 5.1.3");
    assert_code(&c.reply().await, "354 ");
    // The data, the next transaction and QUIT in one write.
    c.send(
        "Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<d@example.org>\r\nRCPT TO:<e@example.net>\r\nNOOP\r\nQUIT\r\n",
    )
    .await;
    assert_code(&c.reply().await, "250 2.0.0 Ok: queued as");
    assert_code(&c.reply().await, "250 2.1.0");
    assert_code(&c.reply().await, "250 2.1.5");
    assert_code(&c.reply().await, "250 2.0.0 Ok");
    assert_code(&c.reply().await, "221 2.0.0");
    c.expect_closed().await;

    // One submission, split by recipient domain; the unfinished second transaction is gone.
    let messages = server.messages().await;
    assert_eq!(messages.len(), 2);
    assert!(messages.iter().all(|m| m.meta.mail_from == "a@example.org"));
    let mut queues: Vec<_> = messages.iter().map(|m| m.meta.queue.as_str()).collect();
    queues.sort();
    assert_eq!(queues, ["example.com", "example.net"]);
    server.stop().await;
}

#[tokio::test]
async fn bad_sequences_and_unknown_commands() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "503 5.5.1");
    c.cmd("EHLO client.test").await;
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "503 5.5.1");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "250 2.1.0");
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "503 5.5.1");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "250 2.1.5");
    // RSET ends the transaction: DATA is out of sequence again.
    assert_code(&c.cmd("RSET").await, "250 2.0.0");
    assert_code(&c.cmd("DATA").await, "503 5.5.1");
    assert_code(&c.cmd("FROB").await, "500 5.5.1");
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
    assert_code(&c.cmd("HELP").await, "214 2.0.0");
    assert_code(&c.cmd("VRFY someone").await, "252 2.5.2");
    assert_code(&c.cmd("EXPN list").await, "502 5.5.1");
    assert_code(&c.cmd("STARTTLS").await, "220 2.0.0"); // then the client goes away
    drop(c);
    assert!(server.messages().await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn address_and_parameter_errors() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    assert_code(&c.cmd("MAIL FROM:<a..b@example.org>").await, "501 5.1.7");
    assert_code(&c.cmd("MAIL FROM:<a@[192.0.2.1]>").await, "501 5.1.7");
    assert_code(&c.cmd("MAIL FROM:a@example.org").await, "501 5.5.2");
    assert_code(&c.cmd("MAIL FROM:<a@example.org> FROBNICATE=1").await, "555 5.5.4");
    assert_code(&c.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME").await, "555 5.5.4");
    assert_code(&c.cmd("MAIL FROM:<δ@example.org>").await, "553 5.6.7");
    assert_code(&c.cmd("MAIL FROM:<δ@example.org> SMTPUTF8 BODY=8BITMIME").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<postmaster>").await, "501 5.1.3");
    assert_code(&c.cmd("RCPT TO:<>").await, "501 5.1.3");
    assert_code(&c.cmd("RCPT TO:<x@>").await, "501 5.1.3");
    assert_code(&c.cmd("RCPT TO:<ω@παράδειγμα.example>").await, "250 2.1.5");
    // The null sender is allowed (bounces).
    c.cmd("RSET").await;
    assert_code(&c.cmd("MAIL FROM:<>").await, "250 2.1.0");
    assert_code(&c.cmd("QUIT").await, "221 2.0.0");
    server.stop().await;
}

#[tokio::test]
async fn size_limits_at_mail_and_in_data() {
    let server = start(SmtpConfig { max_message_bytes: 2048, ..config() }).await;
    let mut c = server.connect().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250-SIZE 2048"), "{ehlo}");
    assert_code(&c.cmd("MAIL FROM:<a@example.org> SIZE=2049").await, "552 5.3.4");
    assert_code(&c.cmd("MAIL FROM:<a@example.org> SIZE=2048").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    // Far more than the limit, in several writes: the relay reads to the end, then refuses.
    let line = format!("{}\r\n", "x".repeat(998));
    c.send("Subject: big\r\n\r\n").await;
    for _ in 0..20 {
        c.send(&line).await;
    }
    c.send(".\r\n").await;
    assert_code(&c.reply().await, "552 5.3.4");
    // The session goes on, in sync, and a message within the limit is accepted.
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
    let reply = c.send_message("a@example.org", &["b@example.net"], &sample_message("small")).await;
    assert_code(&reply, "250 2.0.0 Ok: queued as");
    let messages = server.messages().await;
    assert_eq!(messages.len(), 1);
    assert_eq!(header(&messages[0], "Subject").unwrap(), "small");
    server.stop().await;
}

#[tokio::test]
async fn a_large_message_is_stored_intact() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let lines: String = (0..4000).map(|i| format!("line {i:05} {}\r\n", "z".repeat(70))).collect();
    let data = format!("Subject: large\r\n\r\n{lines}");
    assert_code(&c.send_message("a@example.org", &["b@example.net"], &data).await, "250 2.0.0");
    let messages = server.messages().await;
    let body = body_text(&messages[0]);
    assert!(body.ends_with(&data), "the client's data is stored unchanged after the added headers");
    server.stop().await;
}

#[tokio::test]
async fn too_many_recipients() {
    let server = start(SmtpConfig { max_recipients: 2, ..config() }).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    assert_code(&c.cmd("RCPT TO:<r1@example.net>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<r2@example.net>").await, "250 2.1.5");
    assert_code(&c.cmd("RCPT TO:<r3@example.net>").await, "452 4.5.3");
    assert_code(&c.cmd("DATA").await, "354");
    c.send(format!("{}.\r\n", sample_message("two"))).await;
    assert_code(&c.reply().await, "250 2.0.0");
    let messages = server.messages().await;
    assert_eq!(messages.len(), 1);
    let rcpts: Vec<_> = messages[0].meta.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["r1@example.net", "r2@example.net"]);
    // No `for` clause with several recipients.
    assert!(!header(&messages[0], "Received").unwrap().contains(" for <"));
    server.stop().await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    let server = start(SmtpConfig { max_errors: 3, ..config() }).await;
    let mut c = server.connect().await;
    assert_code(&c.cmd("FROB").await, "500 5.5.1");
    assert_code(&c.cmd("RCPT TO:<a@example.net>").await, "503 5.5.1");
    // The third error is answered, then 421 and the connection is closed.
    c.send("FROB\r\nNOOP\r\n").await;
    assert_code(&c.reply().await, "500 5.5.1");
    assert_code(&c.reply().await, "421 4.7.0 relay.test Too many errors");
    c.expect_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn overlong_command_lines_are_refused_and_skipped() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    c.send(format!("NOOP {}\r\nNOOP\r\n", "y".repeat(10_000))).await;
    assert_code(&c.reply().await, "500 5.5.2 Line too long");
    // The rest of the long line was skipped, not read as commands.
    assert_code(&c.reply().await, "250 2.0.0");
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
    server.stop().await;
}

/// RFC 5321 §4.5.3.1.6: 998 bytes per line (1000 with CRLF). A longer line is refused after
/// the final dot, naming the line, and nothing is queued; the session stays in sync.
#[tokio::test]
async fn data_lines_longer_than_the_limit_are_refused() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let longest = format!("Subject: fits\r\n\r\n{}\r\n", "a".repeat(998));
    assert_code(&c.send_message("a@example.org", &["b@example.net"], &longest).await, "250 2.0.0");
    // 999 bytes on line 4, sent in pieces so the line spans several reads.
    assert_code(&c.cmd("MAIL FROM:<c@example.org>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    c.send("Subject: too long\r\n\r\nshort line\r\n").await;
    for _ in 0..9 {
        c.send("b".repeat(111)).await;
    }
    c.send("\r\nmore text after it\r\n.\r\n").await;
    let reply = c.reply().await;
    assert_code(&reply, "550 5.6.0 Line 4 of the message is longer than 998 bytes");
    assert!(reply.contains("not queued"), "{reply}");
    // Nothing was lost from the stream: the next command and message work.
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
    let reply = c.send_message("d@example.org", &["b@example.net"], &sample_message("after")).await;
    assert_code(&reply, "250 2.0.0");

    let messages = server.messages().await;
    let senders: Vec<&str> = messages.iter().map(|m| m.meta.mail_from.as_str()).collect();
    assert_eq!(senders, ["a@example.org", "d@example.org"], "the refused message was not queued");
    assert!(body_text(&messages[0]).ends_with(&longest));
    server.stop().await;
}

#[tokio::test]
async fn a_raised_line_limit_passes_long_lines_on_unchanged() {
    let server = start(SmtpConfig { max_line_length: 5000, ..config() }).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let data = format!("Subject: long\r\n\r\n{}\r\n", "z".repeat(4000));
    assert_code(&c.send_message("a@example.org", &["b@example.net"], &data).await, "250 2.0.0");
    let data = format!("Subject: longer\r\n\r\n{}\r\n", "z".repeat(5001));
    assert_code(&c.send_message("a@example.org", &["b@example.net"], &data).await, "550 5.6.0 Line 3");
    let messages = server.messages().await;
    assert_eq!(messages.len(), 1);
    assert!(body_text(&messages[0]).ends_with(&format!("{}\r\n", "z".repeat(4000))));
    server.stop().await;
}

/// `data_timeout` bounds the whole message, from 354 to the final dot: a client that keeps
/// trickling bytes (so no single read waits for `command_timeout`) is still cut off.
#[tokio::test]
async fn a_client_stalling_in_data_is_timed_out() {
    let server = start(SmtpConfig { data_timeout: Duration::from_secs(1), ..config() }).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "250 2.1.5");
    assert_code(&c.cmd("DATA").await, "354");
    let (read, mut write) = tokio::io::split(c.into_inner());
    let trickle = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        write.write_all(b"Subject: slow\r\n\r\n").await.unwrap();
        // Until the server hangs up.
        while write.write_all(b"x").await.is_ok() && write.flush().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut read = tokio::io::BufReader::new(read);
    let mut reply = String::new();
    tokio::time::timeout(IO_TIMEOUT, read.read_line(&mut reply)).await.expect("no reply").unwrap();
    assert_code(&reply, "421 4.4.2 relay.test Timeout exceeded while receiving message data");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(IO_TIMEOUT, read.read_to_end(&mut rest)).await.expect("connection not closed");
    assert!(rest.is_empty(), "nothing after 421: {:?}", String::from_utf8_lossy(&rest));
    tokio::time::timeout(IO_TIMEOUT, trickle).await.unwrap().unwrap();
    assert!(server.messages().await.is_empty(), "a message cut off mid-DATA is not queued");
    server.stop().await;
}

/// SMTP smuggling: only CRLF.CRLF ends the data. `\n.\n` and `\r\n.\n` (and `\n.\r\n`) are
/// message content, so the commands after them are part of the message, not a second one.
#[tokio::test]
async fn bare_line_feeds_never_end_the_data() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    c.cmd("RCPT TO:<b@example.net>").await;
    assert_code(&c.cmd("DATA").await, "354");
    let smuggled = "MAIL FROM:<admin@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: forged\r\n\r\n";
    c.send(format!(
        "Subject: carrier\r\n\r\none\n.\n{smuggled}two\r\n.\n{smuggled}three\n.\r\n{smuggled}four\r\n.\r\nNOOP\r\n"
    ))
    .await;
    assert_code(&c.reply().await, "250 2.0.0 Ok: queued as");
    // The very next reply is the NOOP's: no smuggled command was executed.
    assert_code(&c.reply().await, "250 2.0.0 Ok");
    assert_code(&c.cmd("QUIT").await, "221");

    let messages = server.messages().await;
    assert_eq!(messages.len(), 1, "exactly one message");
    let m = &messages[0];
    assert_eq!(m.meta.recipients.len(), 1);
    assert_eq!(m.meta.recipients[0].address, "b@example.net");
    let body = body_text(m);
    assert_eq!(body.matches("RCPT TO:<victim@example.com>").count(), 3, "{body}");
    assert!(body.ends_with("four\r\n"));
    // Stored with CRLF only: no bare LF or CR is left for a next hop to misread.
    let bytes = &m.body[..];
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            assert_eq!(bytes.get(i.wrapping_sub(1)), Some(&b'\r'), "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn dot_stuffing_and_the_empty_message() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let reply =
        c.send_message("a@example.org", &["b@example.net"], "Subject: dots\r\n\r\n..leading dot\r\n...\r\n").await;
    assert_code(&reply, "250 2.0.0");
    // An empty message: the dot right after DATA ends it.
    let reply = c.send_message("z@example.org", &["b@example.net"], "").await;
    assert_code(&reply, "250 2.0.0");
    let messages = server.messages().await;
    assert_eq!(messages.len(), 2);
    assert!(body_text(&messages[0]).ends_with("Subject: dots\r\n\r\n.leading dot\r\n..\r\n"));
    let empty = body_text(&messages[1]);
    assert!(empty.starts_with("Received: ") && empty.contains("Message-ID: ") && empty.ends_with("\r\n"), "{empty}");
    server.stop().await;
}

/// Never an open relay: a client outside `relay_networks` cannot send without AUTH. The
/// refusal comes at RCPT (530 5.7.0, per recipient), and nothing is ever queued.
#[tokio::test]
async fn unauthenticated_clients_outside_relay_networks_are_refused_at_rcpt() {
    // Enough errors allowed to see every reply (the next test is about the limit).
    let config = SmtpConfig { relay_networks: vec!["192.0.2.0/24".parse().unwrap()], max_errors: 100, ..config() };
    let server = start(config).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "530 5.7.0 Authentication required");
    assert_code(&c.cmd("RCPT TO:<c@example.com>").await, "530 5.7.0 Authentication required");
    // No recipient was accepted, so there is nothing to send data for.
    assert_code(&c.cmd("DATA").await, "503 5.5.1 Send RCPT first");
    assert_code(&c.cmd("RSET").await, "250 2.0.0");
    // AUTH needs TLS first.
    assert_code(&c.cmd(&format!("AUTH PLAIN {}", plain("apikey", API_KEY))).await, "538 5.7.11");
    // Pipelining the whole transaction does not get around it: the data that follows the
    // refused DATA is read as (unknown) commands, never as a message.
    c.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\nQUIT\r\n").await;
    assert_code(&c.reply().await, "250 2.1.0");
    assert_code(&c.reply().await, "530 5.7.0");
    assert_code(&c.reply().await, "503 5.5.1");
    assert_code(&c.reply().await, "500 5.5.1"); // "Subject: x"
    assert_code(&c.reply().await, "500 5.5.1"); // the empty line
    assert_code(&c.reply().await, "500 5.5.1"); // "x"
    assert_code(&c.reply().await, "500 5.5.1"); // "."
    assert_code(&c.reply().await, "221 2.0.0");
    c.expect_closed().await;
    assert!(server.messages().await.is_empty(), "nothing was queued");
    server.stop().await;
}

/// A client trying recipient after recipient is cut off: every refused RCPT is an error.
#[tokio::test]
async fn relay_probing_ends_the_session_after_max_errors() {
    let config = SmtpConfig { relay_networks: vec![], max_errors: 3, ..config() };
    let server = start(config).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<r1@example.net>").await, "530 5.7.0");
    assert_code(&c.cmd("RCPT TO:<r2@example.net>").await, "530 5.7.0");
    c.send("RCPT TO:<r3@example.net>\r\nRCPT TO:<r4@example.net>\r\n").await;
    assert_code(&c.reply().await, "530 5.7.0");
    assert_code(&c.reply().await, "421 4.7.0 relay.test Too many errors");
    c.expect_closed().await;
    assert!(server.messages().await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn auth_without_tls_when_allowed_by_config() {
    let config = SmtpConfig { relay_networks: vec![], auth_requires_tls: false, ..config() };
    let server = start(config).await;
    let mut c = server.connect().await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    assert_code(&c.cmd("AUTH CRAM-MD5").await, "504 5.5.4");
    assert_code(&c.cmd(&format!("AUTH PLAIN {}", plain("apikey", "SG.wrong"))).await, "535 5.7.8");
    assert_code(&c.cmd(&format!("AUTH PLAIN {}", plain(USER, "wrong"))).await, "535 5.7.8");
    assert_code(&c.cmd("AUTH PLAIN !!!notbase64").await, "501 5.5.2");
    // PLAIN without an initial response, cancelled with `*`.
    assert_code(&c.cmd("AUTH PLAIN").await, "334");
    assert_code(&c.cmd("*").await, "501 5.7.0");
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "250 2.1.0");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "530 5.7.0");
    // AUTH is not allowed inside a transaction: RSET first.
    assert_code(&c.cmd("AUTH PLAIN").await, "503 5.5.1");
    assert_code(&c.cmd("RSET").await, "250 2.0.0");
    // PLAIN without an initial response, then the right key.
    assert_code(&c.cmd("AUTH PLAIN").await, "334");
    assert_code(&c.cmd(&plain("apikey", API_KEY)).await, "235 2.7.0");
    assert_code(&c.cmd(&format!("AUTH PLAIN {}", plain("apikey", API_KEY))).await, "503 5.5.1");
    let reply = c.send_message("a@example.org", &["b@example.net"], &sample_message("authenticated")).await;
    assert_code(&reply, "250 2.0.0");
    let messages = server.messages().await;
    assert_eq!(messages[0].meta.tenant, "apikey:acme");
    assert!(header(&messages[0], "Received").unwrap().contains("with ESMTPA id"));
    server.stop().await;
}

#[tokio::test]
async fn starttls_then_auth_login_as_a_configured_user() {
    let config = SmtpConfig { relay_networks: vec![], ..config() };
    let server = start(config).await;
    let (mut c, _) = server.connect_tls().await;
    // State was reset: EHLO again before anything else.
    assert_code(&c.cmd("MAIL FROM:<a@example.org>").await, "503 5.5.1");
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "STARTTLS offered twice: {ehlo}");
    assert_code(&c.cmd("STARTTLS").await, "503 5.5.1");
    assert_code(&c.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_code(&c.cmd(&BASE64.encode(USER)).await, "334 UGFzc3dvcmQ6");
    assert_code(&c.cmd(&BASE64.encode("not it")).await, "535 5.7.8");
    // LOGIN with the user name as initial response.
    assert_code(&c.cmd(&format!("AUTH LOGIN {}", BASE64.encode(USER))).await, "334 UGFzc3dvcmQ6");
    assert_code(&c.cmd(&BASE64.encode(PASSWORD)).await, "235 2.7.0");
    let reply = c.send_message("a@example.org", &["b@example.net"], &sample_message("over tls")).await;
    assert_code(&reply, "250 2.0.0");
    assert_code(&c.cmd("QUIT").await, "221");
    let messages = server.messages().await;
    assert_eq!(messages[0].meta.tenant, "smtp:billing");
    let received = header(&messages[0], "Received").unwrap();
    assert!(received.contains("(using TLSv1_3 with cipher"), "{received}");
    assert!(received.contains("with ESMTPSA id"), "{received}");
    server.stop().await;
}

/// CVE-2011-0411: commands sent in plain text after STARTTLS must not run inside TLS.
#[tokio::test]
async fn plaintext_injected_after_starttls_is_discarded() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.send("EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<injected@example.org>\r\nRCPT TO:<b@example.net>\r\n").await;
    assert_code(&c.reply().await, "250-relay.test");
    assert_code(&c.reply().await, "220 2.0.0");
    let mut c = c.start_tls(server.certificate.clone().unwrap()).await;
    // Had the injected MAIL run, its reply would come before this one and RCPT would work.
    assert_code(&c.cmd("NOOP").await, "250 2.0.0 Ok");
    assert_code(&c.cmd("EHLO client.test").await, "250-relay.test");
    assert_code(&c.cmd("RCPT TO:<b@example.net>").await, "503 5.5.1");
    server.stop().await;
}

#[tokio::test]
async fn x_smtpapi_sets_categories_and_custom_args() {
    let server = start(config()).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let data = "X-SMTPAPI: {\"category\": \"newsletter\", \"unique_args\": {\"user_id\": \"42\"},\r\n \"ip_pool\": \"bulk\"}\r\nSubject: api\r\n\r\nbody\r\n";
    assert_code(&c.send_message("a@example.org", &["b@example.net"], data).await, "250 2.0.0");
    let bad = "X-SMTPAPI: {\"category\": \r\n\r\nbody\r\n";
    assert_code(&c.send_message("a@example.org", &["b@example.net"], bad).await, "550 5.6.0 X-SMTPAPI header");
    let messages = server.messages().await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.meta.categories, ["newsletter"]);
    assert_eq!(m.meta.custom_args.get("user_id").map(String::as_str), Some("42"));
    assert_eq!(m.meta.ip_pool.as_deref(), Some("bulk"));
    assert!(header(m, "X-SMTPAPI").is_none(), "the header is removed");
    assert_eq!(header(m, "Subject").unwrap(), "api");
    server.stop().await;
}

#[tokio::test]
async fn connections_over_the_limit_get_421() {
    let server = start(SmtpConfig { max_connections: 1, ..config() }).await;
    let mut first = server.connect().await;
    let mut second = Client::new(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    assert_code(&second.reply().await, "421 4.7.0 relay.test Too many connections");
    second.expect_closed().await;
    assert_code(&first.cmd("QUIT").await, "221");
    first.expect_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn an_idle_client_is_timed_out() {
    let server = start(SmtpConfig { command_timeout: Duration::from_secs(1), ..config() }).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    // Send nothing more: the server gives up with 421 4.4.2.
    assert_code(&c.reply().await, "421 4.4.2 relay.test Timeout exceeded");
    c.expect_closed().await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_transaction_in_progress_finish() {
    let server = start(config()).await;
    let mut busy = server.connect().await;
    busy.cmd("EHLO client.test").await;
    busy.cmd("MAIL FROM:<a@example.org>").await;
    busy.cmd("RCPT TO:<b@example.net>").await;
    let mut idle = server.connect().await;
    idle.cmd("EHLO idle.test").await;

    server.cancel.cancel();
    // The idle session is told at once.
    assert_code(&idle.reply().await, "421 4.3.2 relay.test Service shutting down");
    idle.expect_closed().await;
    // The busy one completes its message, then is told.
    assert_code(&busy.cmd("DATA").await, "354");
    busy.send(format!("{}.\r\n", sample_message("last one"))).await;
    assert_code(&busy.reply().await, "250 2.0.0 Ok: queued as");
    assert_code(&busy.reply().await, "421 4.3.2");
    busy.expect_closed().await;
    let messages = server.messages().await;
    assert_eq!(messages.len(), 1);
    tokio::time::timeout(IO_TIMEOUT, server.task).await.unwrap().unwrap().unwrap();
    // No longer listening.
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

/// A spool that is down: the relay must answer 451, never 250.
struct UnavailableSpool;

#[async_trait]
impl Spool for UnavailableSpool {
    async fn enqueue(&self, _: Vec<Message>) -> Result<(), SpoolError> {
        Err(SpoolError::Unavailable("ceph cluster below min_size".into()))
    }
    async fn lease(&self, _: LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        Ok(Vec::new())
    }
    async fn reschedule(&self, lease: &Lease, _: MessageMeta) -> Result<(), SpoolError> {
        Err(SpoolError::LeaseLost(lease.id))
    }
    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        Err(SpoolError::LeaseLost(lease.id))
    }
    async fn get(&self, _: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        Ok(None)
    }
    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        Ok(SpoolCounts::default())
    }
    fn backend(&self) -> &'static str {
        "unavailable"
    }
}

#[tokio::test]
async fn an_unavailable_spool_gets_451_not_250() {
    let server = start_with(config(), Some(Arc::new(UnavailableSpool)), true).await;
    let mut c = server.connect().await;
    c.cmd("EHLO client.test").await;
    let reply = c.send_message("a@example.org", &["b@example.net"], &sample_message("lost?")).await;
    assert_code(&reply, "451 4.3.0 Mail system temporarily unavailable");
    // 451 is not a client error: the session goes on.
    assert_code(&c.cmd("NOOP").await, "250 2.0.0");
    server.stop().await;
}
