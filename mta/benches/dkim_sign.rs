//! DKIM signatures per second on one core: RSA-2048, Ed25519, and both (dual signing), over
//! a typical 5 KB message. The whole per-message path is measured: reading the headers,
//! the policy decision, canonicalisation, hashing and the signature(s).
//!
//!     cargo bench -p sluice-mta --bench dkim_sign
//!
//! docs/benchmarks.md puts the results next to `openssl speed rsa2048 ed25519`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{Ed25519KeyPair, RSA_PKCS1_SHA256};
use sluice_mta::dkim::{DkimConfig, DkimKeyConfig, DkimSigning, HeaderFacts, KeyAlgorithm, PrivateKey};

fn message() -> Vec<u8> {
    let mut m = String::from(
        "From: \"Shop\" <news@rsa.bench>\r\nTo: customer@example.com\r\nSubject: Your weekly offers\r\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <01JBENCH@sluice.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nList-Unsubscribe: <mailto:unsub@rsa.bench>\r\n\r\n",
    );
    while m.len() < 5300 {
        m.push_str("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n");
    }
    m.into_bytes()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = Vec::new();
    for (domain, selector, algorithm, bits) in [
        ("rsa.bench", "rsa", KeyAlgorithm::Rsa, 2048),
        ("ed.bench", "ed", KeyAlgorithm::Ed25519, 0),
        ("dual.bench", "rsa", KeyAlgorithm::Rsa, 2048),
        ("dual.bench", "ed", KeyAlgorithm::Ed25519, 0),
    ] {
        let path = dir.path().join(format!("{domain}.{selector}.pem"));
        PrivateKey::generate(algorithm, bits).unwrap().write_new(&path).unwrap();
        keys.push(DkimKeyConfig { domain: domain.into(), selector: selector.into(), private_key: path, tenants: vec![] });
    }
    let signing = DkimSigning::load(&DkimConfig { keys, ..DkimConfig::default() }).unwrap();
    let rsa = message();
    let text = String::from_utf8(rsa.clone()).unwrap();
    let ed = text.replace("rsa.bench", "ed.bench").into_bytes();
    let dual = text.replace("rsa.bench", "dual.bench").into_bytes();

    let mut group = c.benchmark_group("dkim_sign");
    group.throughput(Throughput::Elements(1));
    for (name, msg) in [("rsa2048", &rsa), ("ed25519", &ed), ("dual_rsa2048_ed25519", &dual)] {
        assert!(signing.sign_message("bench", msg).unwrap().is_some(), "{name} is signed");
        group.bench_function(name, |b| b.iter(|| signing.sign_message("bench", black_box(msg)).unwrap()));
    }
    group.finish();

    // Where the time goes: the bare private-key operation of aws-lc (the floor for the
    // rows above; OpenSSL's `speed` measures the same thing), and reading the headers.
    let mut parts = c.benchmark_group("dkim_parts");
    parts.throughput(Throughput::Elements(1));
    let rsa_key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let rng = SystemRandom::new();
    let mut sig = vec![0u8; rsa_key.public_modulus_len()];
    parts.bench_function("aws_lc_rsa2048_sign", |b| {
        b.iter(|| rsa_key.sign(&RSA_PKCS1_SHA256, &rng, black_box(b"canonical headers"), &mut sig).unwrap())
    });
    let ed_key = Ed25519KeyPair::generate().unwrap();
    parts.bench_function("aws_lc_ed25519_sign", |b| b.iter(|| ed_key.sign(black_box(&[7u8; 32]))));
    parts.bench_function("read_headers", |b| b.iter(|| HeaderFacts::read(black_box(&rsa))));
    parts.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
