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

/// Senders, each with a recipient of its own, in the backup-under-load test.
const SENDERS: usize = 4;
/// Most messages each sender sends (the test stops them sooner).
const MOST_EACH: u32 = 400;
/// Pause after each acknowledged message, per sender.
const PACE: std::time::Duration = std::time::Duration::from_millis(10);
/// Payload size: large enough that the backup takes a while.
const LOAD_PAYLOAD: usize = 16 * 1024;

fn load_payload(sender: usize, n: u32) -> Vec<u8> {
    let mut p = vec![u8::try_from(sender).unwrap(); LOAD_PAYLOAD];
    p[..4].copy_from_slice(&n.to_be_bytes());
    p
}

/// An acknowledged message: its sequence number, payload and when the
/// acknowledgement came.
type Acked = (u64, Vec<u8>, std::time::Instant);

/// Every message of `client`'s queue from the start (bounded).
async fn whole_queue(client: &quicnprotochat_client::Client) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let mut out = Vec::new();
    let mut from = 0;
    let mut incarnation = Vec::new();
    for _ in 0..1_000 {
        let batch = client.fetch_batch(from, 100).await.unwrap();
        incarnation = batch.incarnation;
        let Some(last) = batch.messages.last() else {
            break;
        };
        from = last.seq + 1;
        out.extend(batch.messages.into_iter().map(|m| (m.seq, m.payload)));
    }
    (incarnation, out)
}

#[tokio::test]
async fn a_backup_taken_while_clients_send_restores_every_message_acknowledged_before_it() {
    use std::cell::{Cell, RefCell};
    use std::time::{Duration, Instant};

    use quicnprotochat_client::{Client, EnqueueResult};
    use quicnprotochat_core::Identity;

    let mut server = ServerProcess::start(BIN).unwrap();
    let config = server.client_config().unwrap();
    let mut recipients = Vec::new();
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let id = Identity::generate().unwrap();
        let c = Client::connect(config.clone()).await.unwrap();
        c.init_auth(&id).await.unwrap();
        c.register(&format!("recipient{i}")).await.unwrap();
        recipients.push((id, c));
        let id = Identity::generate().unwrap();
        let c = Client::connect(config.clone()).await.unwrap();
        c.init_auth(&id).await.unwrap();
        senders.push(c);
    }
    // (seq, payload, when acknowledged) per recipient.
    let acked: RefCell<Vec<Vec<Acked>>> = RefCell::new(vec![Vec::new(); SENDERS]);
    let stop = Cell::new(false);
    let backup = server.temp_dir().join("under-load.db");
    let send = |i: usize| {
        let (acked, stop, sender) = (&acked, &stop, &senders[i]);
        let to = recipients[i].0.public_key();
        async move {
            for n in 0..MOST_EACH {
                if stop.get() {
                    break;
                }
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&n.to_be_bytes());
                id[4] = u8::try_from(i).unwrap();
                let payload = load_payload(i, n);
                match sender.enqueue(&[to], id, payload.clone()).await.unwrap() {
                    EnqueueResult::Stored(seqs) => {
                        acked.borrow_mut()[i].push((seqs[0], payload, Instant::now()));
                    }
                    EnqueueResult::Duplicate => panic!("message {n} of sender {i} was new"),
                }
                // Below the default rate limit of 100 enqueues/s per sender.
                tokio::time::sleep(PACE).await;
            }
        }
    };
    let cmd = {
        let mut c = server.command();
        c.args(["backup", "--to", backup.to_str().unwrap()])
            .stderr(Stdio::inherit());
        c
    };
    let drive = async {
        // Let the load build up a store worth copying first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let began = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = cmd;
            cmd.output()
        })
        .await
        .unwrap()
        .unwrap();
        let ended = Instant::now();
        assert!(out.status.success(), "{out:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.set(true);
        (began, ended)
    };
    let ((began, ended), (), (), (), ()) = tokio::join!(drive, send(0), send(1), send(2), send(3));
    let acked = acked.into_inner();
    let before: usize = acked
        .iter()
        .map(|q| q.iter().filter(|m| m.2 < began).count())
        .sum();
    let during: usize = acked
        .iter()
        .map(|q| q.iter().filter(|m| m.2 >= began && m.2 < ended).count())
        .sum();
    let total: usize = acked.iter().map(Vec::len).sum();
    eprintln!(
        "backup took {:?}; {before} messages acknowledged before it began, {during} while it ran, {total} in all",
        ended - began
    );
    assert!(
        before > 0 && during > 0,
        "the backup ran while clients sent"
    );
    assert!(
        total < SENDERS * MOST_EACH as usize,
        "the senders were stopped, not exhausted"
    );

    let (first, _) = whole_queue(&recipients[0].1).await;
    drop(senders);
    let identities: Vec<Identity> = recipients.into_iter().map(|(id, _)| id).collect();
    server.kill();
    let said = run(&server, &["restore", "--from", backup.to_str().unwrap()]);
    assert!(said.contains("new store incarnation"), "{said}");
    server.restart().unwrap();

    let config = server.client_config().unwrap();
    for (i, id) in identities.iter().enumerate() {
        let c = Client::connect(config.clone()).await.unwrap();
        c.init_auth(id).await.unwrap();
        let (incarnation, restored) = whole_queue(&c).await;
        assert_ne!(
            incarnation, first,
            "the restored store has a new incarnation"
        );
        let must: Vec<(u64, Vec<u8>)> = acked[i]
            .iter()
            .filter(|m| m.2 < began)
            .map(|m| (m.0, m.1.clone()))
            .collect();
        let may = acked[i].iter().filter(|m| m.2 < ended).count();
        assert!(
            restored.len() >= must.len() && restored.len() <= may,
            "queue {i}: {} restored, {} acknowledged before the backup, {may} before it ended",
            restored.len(),
            must.len()
        );
        // Nothing lost, in order, and nothing that was not sent: the
        // restored queue is the acknowledged one up to some point.
        let sent: Vec<(u64, Vec<u8>)> = acked[i][..restored.len()]
            .iter()
            .map(|m| (m.0, m.1.clone()))
            .collect();
        assert_eq!(restored, sent, "queue {i}");
        assert_eq!(&restored[..must.len()], &must[..], "queue {i}");
    }
}
