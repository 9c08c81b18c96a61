//! Backup and restore of the real binary's database: a client notices the
//! restored store's new incarnation and reads its queue again from the
//! start, so nothing sent after the restore is skipped and nothing it had
//! already shown is shown twice.

use std::process::Stdio;

use quicnprotochat_client::harness::{ServerProcess, message_texts};

const BIN: &str = env!("CARGO_BIN_EXE_quicnprotochat-server");

fn run(server: &ServerProcess, args: &[&str]) -> String {
    let out = server
        .command()
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?} failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn after_a_restore_clients_read_their_queue_again_and_lose_nothing_sent_since() {
    let mut server = ServerProcess::start(BIN).unwrap();
    let alice = server.messenger("alice").await.unwrap();
    let bob = server.messenger("bob").await.unwrap();
    alice.create_group("g").await.unwrap();
    alice.invite("g", "bob").await.unwrap();
    bob.sync().await.unwrap();

    alice.send("g", "m1").await.unwrap();
    assert_eq!(message_texts(bob.sync().await.unwrap()), ["m1"]);
    // In the backup and not yet acknowledged: it comes back after the
    // restore, after bob has shown it.
    alice.send("g", "m2").await.unwrap();

    let backup = server.data_dir().with_file_name("backup.db");
    let backup_arg = backup.to_str().unwrap();
    // Taken while the server runs.
    let said = run(&server, &["backup", "--to", backup_arg]);
    assert!(said.contains("backup written"), "{said}");

    alice.send("g", "m3").await.unwrap();
    assert_eq!(message_texts(bob.sync().await.unwrap()), ["m2", "m3"]);
    // Enqueued after the backup and never read: the restore loses it.
    alice.send("g", "m4").await.unwrap();

    drop((alice, bob));
    server.kill();
    let said = run(&server, &["restore", "--from", backup_arg]);
    assert!(said.contains("new store incarnation"), "{said}");
    assert!(
        said.contains("replaced database is kept"),
        "the replaced database is kept: {said}"
    );
    server.restart().unwrap();

    // The restored queues number from where the backup stood, so these get
    // sequence numbers bob has already passed.
    let alice = server.reopen_messenger("alice").await.unwrap();
    alice.send("g", "m5").await.unwrap();
    alice.send("g", "m6").await.unwrap();
    let bob = server.reopen_messenger("bob").await.unwrap();
    assert_eq!(
        message_texts(bob.sync().await.unwrap()),
        ["m5", "m6"],
        "bob reads what was sent after the restore, and m2 (read before) not again"
    );
    let history: Vec<String> = bob
        .history("g", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(history, ["m1", "m2", "m3", "m5", "m6"]);
    // And the cursor stays in the new incarnation: nothing more comes.
    assert!(message_texts(bob.sync().await.unwrap()).is_empty());
}
