//! What the user sees: a received message counts as delivered only once
//! the client printed it.  A connection cut at any point of a `sync` may
//! leave messages processed into the profile but not printed; the next
//! command that syncs prints them, and nothing is printed twice.

use std::path::Path;

use quicnprotochat_client::Messenger;
use quicnprotochat_client::harness::{TestServer, UdpRelay};

use crate::cli::{cli, register_via, run_ok};

/// Messages sent before each cut sync.
const PER_ROUND: usize = 3;

/// The texts of the messages among the JSON lines of `stdout`, in order.
fn printed(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "message")
        .map(|v| v["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Alice sends round `round`'s messages; returns their texts.
fn send_round(rt: &tokio::runtime::Runtime, alice: &Messenger, round: u64) -> Vec<String> {
    let texts: Vec<String> = (0..PER_ROUND)
        .map(|i| format!("round {round} #{i}"))
        .collect();
    rt.block_on(async {
        for t in &texts {
            alice.send("g", t).await.unwrap();
        }
    });
    texts
}

/// `sync --json` for `profile`, with short deadlines so a dead connection
/// is given up quickly; its output whether it failed or not.
fn cut_sync(server: &TestServer, profile: &Path) -> std::process::Output {
    cli(server, profile)
        .args([
            "--json",
            "--connect-timeout",
            "1",
            "--call-timeout",
            "1",
            "sync",
        ])
        .output()
        .unwrap()
}

#[test]
fn a_sync_cut_at_any_point_prints_every_message_exactly_once() {
    let server = TestServer::start().unwrap();
    let relay = UdpRelay::start(server.addr()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bob = dir.path().join("bob");
    register_via(&server, &bob, "bob", relay.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let alice = rt.block_on(server.messenger("alice")).unwrap();
    rt.block_on(alice.invite("g", "bob")).unwrap();
    run_ok(cli(&server, &bob).args(["sync"]));

    // An uncut sync: every message printed, and how many datagrams it takes.
    let expected = send_round(&rt, &alice, 0);
    relay.heal();
    let out = run_ok(cli(&server, &bob).args(["--json", "sync"]));
    assert_eq!(printed(out.as_bytes()), expected);
    let datagrams = relay.seen();
    assert!(datagrams > 10, "a sync took only {datagrams} datagrams");

    // Cut after every datagram of it in turn; the cut sync and the next
    // one together print each message once.
    for n in 0..datagrams {
        let expected = send_round(&rt, &alice, n + 1);
        relay.cut_after(n);
        let cut = cut_sync(&server, &bob);
        relay.heal();
        let after = run_ok(cli(&server, &bob).args(["--json", "sync"]));
        let mut shown = printed(&cut.stdout);
        shown.extend(printed(after.as_bytes()));
        assert_eq!(
            shown,
            expected,
            "cut after {n} of {datagrams} datagrams; the cut sync said: {}",
            String::from_utf8_lossy(&cut.stderr)
        );
    }
}
