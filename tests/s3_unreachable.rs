//! A storage service that does not answer: listing must fail, never answer
//! "empty" (an empty listing would read as "no backups" or "WAL absent").
//! Its own test binary, because it points AWS_ENDPOINT at a dead port.

#[tokio::test]
async fn listing_an_unreachable_store_fails() {
    let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    drop(sock);
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "x");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "x");
    std::env::set_var("AWS_REGION", "us-east-1");
    // Give up after about a second (the default retries for two minutes).
    std::env::set_var("PGCAIRN_STORAGE_RETRY_SECS", "1");
    let b = pgcairn::repo::backend::open("s3://pgcairn-test/dead", false).expect("open");
    let listed = pgcairn::repo::backend::list(&*b, "keys/").await;
    let err = listed.expect_err("listing an unreachable store must fail");
    assert!(
        matches!(err, pgcairn::repo::RepoError::Storage { .. }),
        "{err}"
    );
    let got = pgcairn::repo::backend::get(&*b, "config")
        .await
        .expect_err("get must fail");
    assert!(
        !got.is_not_found(),
        "a failed request is not 'absent': {got}"
    );
}
