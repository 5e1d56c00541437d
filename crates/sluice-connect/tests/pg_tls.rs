//! TLS to PostgreSQL with libpq's `sslmode`/`sslrootcert`, against a cluster this test starts
//! that refuses unencrypted TCP connections (its certificate is signed by a CA made here).

#[path = "support/servers.rs"]
mod servers;
use sluice_connect::pg_tls;

async fn query_one(url: &str) -> anyhow::Result<i32> {
    let (client, _task) = pg_tls::parse(url)?.connect("test").await?;
    Ok(client.query_one("SELECT 1 + 1", &[]).await?.get(0))
}

#[tokio::test]
async fn sslmodes_against_a_tls_only_server() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = servers::private_ca(tmp.path());
    let pg = servers::PgServer::start_with_tls(Some((&cert, &key)));
    let at = |host: &str, q: &str| format!("postgres://postgres@{host}:{}/postgres?{q}", pg.port);
    let ca = ca.display();
    // Verified against the CA, by chain and host name.
    assert_eq!(query_one(&at("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await.unwrap(), 2);
    assert_eq!(query_one(&at("localhost", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await.unwrap(), 2);
    // Encrypted without checks (libpq's prefer, the default, and require).
    assert_eq!(query_one(&at("127.0.0.1", "sslmode=require")).await.unwrap(), 2);
    assert_eq!(query_one(&at("127.0.0.1", "")).await.unwrap(), 2);
    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca does not.
    let e = query_one(&at("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).await.unwrap_err();
    assert!(format!("{e:#}").to_lowercase().contains("certificate"), "{e:#}");
    assert_eq!(query_one(&at("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await.unwrap(), 2);
    // Not signed by a CA the system trusts.
    let e = query_one(&at("localhost", "sslmode=verify-full")).await.unwrap_err();
    assert!(format!("{e:#}").to_lowercase().contains("certificate"), "{e:#}");
    // Unencrypted: the server refuses it.
    let e = query_one(&at("127.0.0.1", "sslmode=disable")).await.unwrap_err();
    assert!(format!("{e:#}").contains("no encryption") || format!("{e:#}").contains("pg_hba"), "{e:#}");
}
