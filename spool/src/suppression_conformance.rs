//! The conformance suite every [`SuppressionList`] backend must pass. Use
//! [`suppression_conformance_tests!`] like `spool_conformance_tests!`.

use std::sync::Arc;

use crate::{Suppression, SuppressionList};

fn addrs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub async fn suppressed_addresses_are_found_case_insensitively(list: Arc<dyn SuppressionList>) {
    list.suppress(vec![Suppression::new("t1", "Gone@Example.COM", "550 5.1.1 user unknown", "generic.user_unknown")]).await.unwrap();
    let got = list.check("t1", &addrs(&["gone@example.com", "GONE@example.com", "alive@example.com"])).await.unwrap();
    assert_eq!(got, [true, true, false]);
    let entry = list.get("t1", "gone@EXAMPLE.com").await.unwrap().expect("suppressed");
    assert_eq!(entry.address, "gone@example.com");
    assert_eq!(entry.rule, "generic.user_unknown");
    assert_eq!(entry.reason, "550 5.1.1 user unknown");
}

pub async fn suppressions_are_per_tenant(list: Arc<dyn SuppressionList>) {
    list.suppress(vec![Suppression::new("t1", "a@example.com", "550", "r")]).await.unwrap();
    assert_eq!(list.check("t2", &addrs(&["a@example.com"])).await.unwrap(), [false]);
    assert!(list.get("t2", "a@example.com").await.unwrap().is_none());
    // a tenant name that is a prefix of another cannot alias its entries
    list.suppress(vec![Suppression::new("ab", "c@x.test", "550", "r")]).await.unwrap();
    assert_eq!(list.check("a", &addrs(&["bc@x.test"])).await.unwrap(), [false]);
}

pub async fn remove_lifts_a_suppression(list: Arc<dyn SuppressionList>) {
    list.suppress(vec![Suppression::new("t", "a@example.com", "550", "r"), Suppression::new("t", "b@example.com", "550", "r")]).await.unwrap();
    assert!(list.remove("t", "A@example.com").await.unwrap());
    assert!(!list.remove("t", "a@example.com").await.unwrap(), "already gone");
    assert_eq!(list.check("t", &addrs(&["a@example.com", "b@example.com"])).await.unwrap(), [false, true]);
}

pub async fn empty_inputs_are_no_ops(list: Arc<dyn SuppressionList>) {
    list.suppress(Vec::new()).await.unwrap();
    assert!(list.check("t", &[]).await.unwrap().is_empty());
    assert!(list.get("t", "nobody@example.com").await.unwrap().is_none());
}

pub async fn many_addresses_in_one_check(list: Arc<dyn SuppressionList>) {
    let all: Vec<String> = (0..500).map(|i| format!("user{i}@d{}.test", i % 7)).collect();
    let odd: Vec<Suppression> = all.iter().enumerate().filter(|(i, _)| i % 2 == 1).map(|(_, a)| Suppression::new("t", a, "550", "r")).collect();
    list.suppress(odd).await.unwrap();
    let got = list.check("t", &all).await.unwrap();
    assert_eq!(got.len(), all.len());
    assert!(got.iter().enumerate().all(|(i, s)| *s == (i % 2 == 1)));
}

#[macro_export]
macro_rules! suppression_conformance_tests {
    ($make:expr) => {
        $crate::suppression_conformance_tests!(@cases $make;
            suppressed_addresses_are_found_case_insensitively,
            suppressions_are_per_tenant,
            remove_lifts_a_suppression,
            empty_inputs_are_no_ops,
            many_addresses_in_one_check,
        );
    };
    (@cases $make:expr; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let list: ::std::sync::Arc<dyn $crate::SuppressionList> = $make.await;
                $crate::suppression_conformance::$case(list).await;
            }
        )*
    };
}
