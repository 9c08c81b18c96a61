//! Rotating the access token without a restart, through the real binary:
//! the token file is read again on SIGHUP, old and new tokens overlap,
//! connections already authenticated stay, and a reload that fails keeps
//! the tokens in use.

use std::path::Path;
use std::time::Duration;

use quicnprotochat_client::harness::ServerProcess;
use quicnprotochat_client::{Client, ClientConfig, ServerAuth, ServerErrorCode};
use quicnprotochat_core::Identity;

use crate::support::assert_code;

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");
const TOKEN_A: &str = "rotation-token-a-8f0c1e2d3b4a59687766554433221100";
const TOKEN_B: &str = "rotation-token-b-00112233445566778899aabbccddeeff";

fn config(server: &ServerProcess, token: &str) -> ClientConfig {
    ClientConfig::new(
        server.addr(),
        ServerAuth::Pinned(server.fingerprint().unwrap()),
        token,
    )
}

/// A new identity logging in with `token`.
async fn login(
    server: &ServerProcess,
    token: &str,
) -> Result<Client, quicnprotochat_client::ClientError> {
    let client = Client::connect(config(server, token)).await?;
    client.init_auth(&Identity::generate().unwrap()).await?;
    Ok(client)
}

/// How many times the server's log says `what`.
fn log_count(server: &ServerProcess, what: &str) -> usize {
    std::fs::read_to_string(server.log_path())
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// Writes `text` as the token file, sends SIGHUP and waits (bounded) for
/// the server to log `outcome` once more.
fn hang_up(server: &ServerProcess, file: &Path, text: Option<&str>, outcome: &str) {
    match text {
        Some(text) => std::fs::write(file, text).unwrap(),
        None => std::fs::remove_file(file).unwrap(),
    }
    let before = log_count(server, outcome);
    server.signal("HUP").unwrap();
    for _ in 0..250 {
        if log_count(server, outcome) > before {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the server did not log {outcome:?} within 5 s of SIGHUP");
}

#[tokio::test]
async fn tokens_rotate_on_sighup_and_authenticated_connections_stay() {
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("tokens");
    std::fs::write(&file, format!("{TOKEN_A}\n")).unwrap();
    let mut server = ServerProcess::start_with_env(
        BIN,
        &[
            // Only the file's tokens: the harness's token is cleared.
            ("QUICNPROTOCHAT_AUTH_TOKEN", ""),
            ("QUICNPROTOCHAT_AUTH_TOKEN_FILE", file.to_str().unwrap()),
        ],
    )
    .unwrap();
    const RELOADED: &str = "access tokens reloaded";
    const FAILED: &str = "reload failed";

    let a = login(&server, TOKEN_A).await.unwrap();
    a.register("alice").await.unwrap();
    assert_code(
        login(&server, TOKEN_B).await,
        ServerErrorCode::Unauthenticated,
    );

    // Both: B gets in, A still does.
    hang_up(
        &server,
        &file,
        Some(&format!("# rotation\n{TOKEN_A}\n{TOKEN_B}\n")),
        RELOADED,
    );
    let b = login(&server, TOKEN_B).await.unwrap();
    b.register("bob").await.unwrap();
    login(&server, TOKEN_A).await.unwrap();

    // Only B: a new login with A is refused; the connections made with A
    // and B keep working.
    hang_up(&server, &file, Some(&format!("{TOKEN_B}\n")), RELOADED);
    assert_code(
        login(&server, TOKEN_A).await,
        ServerErrorCode::Unauthenticated,
    );
    login(&server, TOKEN_B).await.unwrap();
    assert_eq!(a.resolve("bob").await.unwrap(), b.identity().unwrap());
    assert_eq!(b.resolve("alice").await.unwrap(), a.identity().unwrap());

    // A file without a token, then no file: each reload fails and B stays
    // the token (A stays refused).
    hang_up(&server, &file, Some("# emptied by mistake\n\n"), FAILED);
    login(&server, TOKEN_B).await.unwrap();
    assert_code(
        login(&server, TOKEN_A).await,
        ServerErrorCode::Unauthenticated,
    );
    hang_up(&server, &file, None, FAILED);
    login(&server, TOKEN_B).await.unwrap();
    assert_code(
        login(&server, TOKEN_A).await,
        ServerErrorCode::Unauthenticated,
    );
    assert_eq!(a.resolve("bob").await.unwrap(), b.identity().unwrap());

    assert!(server.is_running(), "SIGHUP never stops the server");
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        !log.contains(TOKEN_A) && !log.contains(TOKEN_B),
        "a token leaked into the log"
    );
}
