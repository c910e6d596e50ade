//! The strategy is the connection's to apply: whatever `ClientOptions::strategy` says, the
//! client hands every job its key and the connection decides whether it becomes a HASH.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use bytes::Bytes;
use dcache_client::{Client, ClientOptions};
use dcache_proto::testing::reference_compile;
use dcache_proto::{CacheKey, JobDesc, Strategy};

use common::{serve, stat};

#[tokio::test]
async fn each_strategy_is_applied_by_the_connection_and_the_outcome_names_its_key() {
    for (i, strategy) in [Strategy::Speculative, Strategy::AskFirst, Strategy::SendAll]
        .into_iter()
        .enumerate()
    {
        let (service, addr, _stop) = serve(&format!("client-strategy-{i}")).await;
        let client = Client::new(ClientOptions {
            strategy,
            ..ClientOptions::new(vec![addr])
        });
        let desc = JobDesc {
            compiler: "gcc".into(),
            language: "cpp-output".into(),
            args: vec!["-c".into()],
            source_len: None,
            identity: None,
        };
        let source = Bytes::from(format!("int strategy_{i};\n").repeat(100));
        let key = CacheKey::compute(&desc, &source);
        let expected = reference_compile(&desc, &source);

        let first = client.compile(desc.clone(), source.clone()).await.unwrap();
        assert_eq!(first.job.result, expected, "{strategy:?}");
        assert_eq!(first.job.strategy, strategy);
        // Send-all sends no HASH, so its outcome has no key; the others carry the one
        // the client computed.
        let want_key = (strategy != Strategy::SendAll).then_some(key);
        assert_eq!(first.job.key, want_key, "{strategy:?}");

        let second = client.compile(desc.clone(), source.clone()).await.unwrap();
        assert_eq!(second.job.result, expected);
        assert!(second.job.origin.is_cached(), "{strategy:?}: a hit");
        assert_eq!(stat(&service, "compiles"), 1, "{strategy:?}");

        // Whatever the strategy, the key finds the result without the source.
        let found = client.lookup(desc, key).await.unwrap().unwrap();
        assert_eq!(found.job.result, expected);
        assert_eq!(found.job.key, Some(key));
        assert_eq!(found.job.strategy, Strategy::Lookup);
    }
}
