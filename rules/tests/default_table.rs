//! The shipped default table compiles, every example passes, and it covers every provider the
//! table format promises.

use sluice_rules::{compile, default_sources};

#[test]
fn default_table_compiles_and_every_example_passes() {
    let table = compile(&default_sources()).unwrap_or_else(|e| panic!("{e}"));
    assert!(table.rules().len() > 100, "a thorough table: {} rules", table.rules().len());
    assert!(table.rules().iter().all(|r| !r.examples.is_empty() && !r.description.is_empty()));
    assert!(table.shadowed().is_empty());
}

#[test]
fn default_table_defines_the_providers_shaping_needs() {
    let table = compile(&default_sources()).unwrap();
    let ids: Vec<&str> = table.providers().list().iter().map(|p| p.id.as_str()).collect();
    for want in [
        "google", "yahoo", "microsoft", "apple", "comcast", "att", "united-internet", "orange", "mailru", "yandex", "qq", "netease",
        "proofpoint", "mimecast", "barracuda", "cisco",
    ] {
        assert!(ids.contains(&want), "provider {want} missing from {ids:?}");
        assert!(table.rules().iter().any(|r| r.provider.is_some_and(|p| table.providers().get(p).id == want)
            || r.description.to_lowercase().contains(&want.replace('-', " "))), "no rule for {want}");
    }
}
