//! Connection limits per client IP, seen on the wire: the refused connection gets the
//! configured 421 as its banner and is closed.

use std::time::Duration;

use sluice_load::sink::{Limits, Scenario, Sink, SinkConfig, Stage};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

async fn banner(stream: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(T, stream.read_line(&mut line)).await.unwrap().unwrap();
    line.trim_end().to_string()
}

async fn closed(stream: &mut BufReader<TcpStream>) -> bool {
    let mut line = String::new();
    tokio::time::timeout(T, stream.read_line(&mut line)).await.unwrap().unwrap() == 0
}

#[tokio::test]
async fn concurrent_connections_over_the_limit_get_421() {
    let limits = Limits {
        max_connections: Some(2),
        connection_reply: "421 4.7.0 Try again later, closing connection. (EHLO) - gsmtp".parse().unwrap(),
        ..Limits::default()
    };
    let sink = Sink::start(SinkConfig { limits, scenario: Scenario::accept_all(), ..SinkConfig::default() }).await.unwrap();
    let mut a = BufReader::new(TcpStream::connect(sink.addr()).await.unwrap());
    let mut b = BufReader::new(TcpStream::connect(sink.addr()).await.unwrap());
    assert!(banner(&mut a).await.starts_with("220 "));
    assert!(banner(&mut b).await.starts_with("220 "));
    let mut c = BufReader::new(TcpStream::connect(sink.addr()).await.unwrap());
    assert_eq!(banner(&mut c).await, "421 4.7.0 Try again later, closing connection. (EHLO) - gsmtp");
    assert!(closed(&mut c).await);
    a.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    assert!(banner(&mut a).await.starts_with("221"));
    assert!(closed(&mut a).await);
    assert!(sink.wait_for(T, |s| s.connections == 3).await);
    // The server gives the slot back before it closes the socket, so after `a` saw the
    // close a new connection is admitted.
    let mut d = BufReader::new(TcpStream::connect(sink.addr()).await.unwrap());
    assert!(banner(&mut d).await.starts_with("220 "));
    let stats = sink.stats();
    assert_eq!(stats.limited, 1);
    assert_eq!(stats.replies_at(Stage::Connect, 421..422), stats.limited);
}

#[tokio::test]
async fn connection_rate_limits_get_421() {
    let limits = Limits { connection_rate: Some("3/h".parse().unwrap()), ..Limits::default() };
    let sink = Sink::start(SinkConfig { limits, scenario: Scenario::accept_all(), ..SinkConfig::default() }).await.unwrap();
    let mut codes = Vec::new();
    for _ in 0..5 {
        let mut s = BufReader::new(TcpStream::connect(sink.addr()).await.unwrap());
        codes.push(banner(&mut s).await[..3].to_string());
    }
    assert_eq!(codes, ["220", "220", "220", "421", "421"]);
    assert_eq!(sink.stats().limited, 2);
}
