//! MLS group flows driven deterministically between profiles, with a toy
//! in-memory "delivery service" that enforces one commit per epoch like the
//! real server.  No network: the core does no IO but its own profile files.

use std::collections::HashMap;

use quicnprotochat_core::clock::{Clock as _, ManualClock};
use quicnprotochat_core::mls_header::{self, FrameKind};
use quicnprotochat_core::{
    CommitOutcome, Delivered, Event, GroupError, IdentityKey, Outgoing, Profile, ProfileKey,
};

/// (delivery message id, payload)
type Delivery = (Vec<u8>, Vec<u8>);

struct Net {
    queues: HashMap<IdentityKey, Vec<Delivery>>,
    epochs: HashMap<Vec<u8>, u64>,
}

impl Net {
    fn new() -> Self {
        Self {
            queues: HashMap::new(),
            epochs: HashMap::new(),
        }
    }

    /// Mirrors the server: a commit is accepted only if no commit of its epoch was.
    fn send(&mut self, out: &Outgoing) -> Result<(), &'static str> {
        let info = mls_header::inspect(&out.payload);
        if info.kind == FrameKind::Commit {
            let (gid, epoch) = (info.group_id.unwrap(), info.epoch.unwrap());
            if self.epochs.get(&gid).is_some_and(|last| *last >= epoch) {
                return Err("stale epoch");
            }
            self.epochs.insert(gid, epoch);
        }
        for r in &out.recipients {
            self.queues
                .entry(*r)
                .or_default()
                .push((out.message_id.to_vec(), out.payload.clone()));
        }
        Ok(())
    }

    fn commit(&mut self, p: &mut Profile, c: CommitOutcome) -> Result<(), &'static str> {
        if let Some(commit) = &c.commit
            && let Err(e) = self.send(commit)
        {
            p.abort_commit(&c.group_id).unwrap();
            return Err(e);
        }
        p.confirm_commit(&c.group_id).unwrap();
        if let Some(w) = &c.welcome {
            self.send(w).unwrap();
        }
        Ok(())
    }

    fn drain(&mut self, p: &mut Profile) -> Vec<Event> {
        let msgs = self.queues.remove(&p.identity_key()).unwrap_or_default();
        let mut events = Vec::new();
        for (id, payload) in msgs {
            events.extend(p.process(&id, &payload).unwrap());
        }
        events
    }
}

fn profile(dir: &std::path::Path, name: &str) -> Profile {
    Profile::create(
        &dir.join(name),
        &ProfileKey::Passphrase(format!("pw-{name}")),
        name,
    )
    .unwrap()
}

fn invite(net: &mut Net, from: &mut Profile, group: &str, to: &mut Profile) {
    let kp = to.generate_key_packages(1, false, 3600).unwrap().remove(0);
    let out = from.add_member(group, &kp, to.identity_key()).unwrap();
    net.commit(from, out).unwrap();
}

/// Alice and Bob in a group "g" that Alice made, Bob's Welcome processed.
fn alice_and_bob_in_g(dir: &std::path::Path) -> (Net, Profile, Profile) {
    let mut net = Net::new();
    let (mut alice, mut bob) = (profile(dir, "alice"), profile(dir, "bob"));
    alice.create_group("g").unwrap();
    invite(&mut net, &mut alice, "g", &mut bob);
    net.drain(&mut bob);
    (net, alice, bob)
}

/// Alice makes a group "g" and adds Bob with one of his key packages (his
/// last-resort one if `last_resort`); Bob's Welcome is taken off the net,
/// unprocessed.
fn alice_invites_bob(
    dir: &std::path::Path,
    last_resort: bool,
) -> (Net, Profile, Profile, Delivery) {
    let mut net = Net::new();
    let (mut alice, mut bob) = (profile(dir, "alice"), profile(dir, "bob"));
    alice.create_group("g").unwrap();
    let one_time = usize::from(!last_resort);
    let kp = bob
        .generate_key_packages(one_time, last_resort, 3600)
        .unwrap()
        .remove(0);
    let out = alice.add_member("g", &kp, bob.identity_key()).unwrap();
    net.commit(&mut alice, out).unwrap();
    let welcome = net.queues.remove(&bob.identity_key()).unwrap().remove(0);
    (net, alice, bob, welcome)
}

fn texts(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.sender.clone(), m.text.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn three_members_chat_remove_update_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Net::new();
    let (mut alice, mut bob, mut carol) = (
        profile(dir.path(), "alice"),
        profile(dir.path(), "bob"),
        profile(dir.path(), "carol"),
    );
    alice.create_group("friends").unwrap();
    invite(&mut net, &mut alice, "friends", &mut bob);
    assert!(
        matches!(&net.drain(&mut bob)[..], [Event::Joined { group, by, .. }] if group == "friends" && by == "alice")
    );
    invite(&mut net, &mut alice, "friends", &mut carol);
    assert!(matches!(&net.drain(&mut carol)[..], [Event::Joined { .. }]));
    assert!(
        matches!(&net.drain(&mut bob)[..], [Event::MembersAdded { members, .. }] if members == &["carol"])
    );

    for (p, text) in [
        (&mut alice, "hi from alice"),
        (&mut bob, "hi from bob"),
        (&mut carol, "hi from carol"),
    ] {
        let out = p.send_text("friends", text).unwrap();
        assert_eq!(out.recipients.len(), 2);
        net.send(&out).unwrap();
    }
    assert_eq!(
        texts(&net.drain(&mut alice)),
        [
            ("bob".into(), "hi from bob".into()),
            ("carol".into(), "hi from carol".into())
        ]
    );
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [
            ("alice".into(), "hi from alice".into()),
            ("carol".into(), "hi from carol".into())
        ]
    );
    assert_eq!(texts(&net.drain(&mut carol)).len(), 2);

    // Remove carol: she learns it, and cannot read what follows.
    let out = alice.remove_member("friends", "carol").unwrap();
    net.commit(&mut alice, out).unwrap();
    assert!(
        net.drain(&mut carol)
            .iter()
            .any(|e| matches!(e, Event::Removed { .. }))
    );
    assert!(
        net.drain(&mut bob)
            .iter()
            .any(|e| matches!(e, Event::MembersRemoved { .. }))
    );
    let secret = alice
        .send_text("friends", "carol must not read this")
        .unwrap();
    assert_eq!(secret.recipients, vec![bob.identity_key()]);
    assert!(matches!(
        carol.process(&secret.message_id, &secret.payload),
        Err(GroupError::Inactive | GroupError::Rejected(_))
    ));
    net.send(&secret).unwrap();
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [("alice".into(), "carol must not read this".into())]
    );

    // Bob self-updates; the group goes on.
    let out = bob.self_update("friends").unwrap();
    net.commit(&mut bob, out).unwrap();
    assert!(
        net.drain(&mut alice)
            .iter()
            .any(|e| matches!(e, Event::KeyUpdated { by, .. } if by == "bob"))
    );
    net.send(&alice.send_text("friends", "after update").unwrap())
        .unwrap();

    // Bob restarts from his profile and reads it.
    let bob_dir = bob.dir().to_path_buf();
    drop(bob);
    let mut bob = Profile::open(&bob_dir, &ProfileKey::Passphrase("pw-bob".into())).unwrap();
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [("alice".into(), "after update".into())]
    );
    assert_eq!(bob.history("friends", 100).unwrap().len(), 5);
    let members: Vec<_> = bob
        .members("friends")
        .unwrap()
        .into_iter()
        .map(|m| m.username)
        .collect();
    assert_eq!(members, ["alice", "bob"]);
    assert!(matches!(
        Profile::open(&bob_dir, &ProfileKey::Passphrase("wrong".into())),
        Err(quicnprotochat_core::StateError::WrongKey)
    ));
}

#[test]
fn concurrent_commits_in_one_epoch_do_not_fork() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Net::new();
    let (mut alice, mut bob, mut carol) = (
        profile(dir.path(), "alice"),
        profile(dir.path(), "bob"),
        profile(dir.path(), "carol"),
    );
    alice.create_group("g").unwrap();
    invite(&mut net, &mut alice, "g", &mut bob);
    invite(&mut net, &mut alice, "g", &mut carol);
    net.drain(&mut bob);
    net.drain(&mut carol);
    // Bob and carol both self-update in the same epoch; bob's commit reaches the DS first.
    let b = bob.self_update("g").unwrap();
    let c = carol.self_update("g").unwrap();
    net.commit(&mut bob, b).unwrap();
    assert_eq!(net.commit(&mut carol, c), Err("stale epoch"));
    // Carol processes the winner and retries.
    net.drain(&mut carol);
    let c = carol.self_update("g").unwrap();
    net.commit(&mut carol, c).unwrap();
    net.drain(&mut alice);
    net.drain(&mut bob);
    let epochs: Vec<u64> = [&alice, &bob, &carol]
        .iter()
        .map(|p| p.groups().unwrap()[0].epoch)
        .collect();
    assert_eq!(epochs, [4, 4, 4], "all members in the same epoch");
    // And they can still talk.
    net.send(&carol.send_text("g", "converged").unwrap())
        .unwrap();
    assert_eq!(
        texts(&net.drain(&mut alice)),
        [("carol".into(), "converged".into())]
    );
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [("carol".into(), "converged".into())]
    );
}

#[test]
fn hostile_and_repeated_input_is_a_typed_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut net = Net::new();
    let (mut alice, mut bob, mut eve) = (
        profile(dir.path(), "alice"),
        profile(dir.path(), "bob"),
        profile(dir.path(), "eve"),
    );
    alice.create_group("g").unwrap();
    invite(&mut net, &mut alice, "g", &mut bob);
    net.drain(&mut bob);
    let before = bob.groups().unwrap();

    assert!(matches!(
        bob.process(b"garbage-id-0000", b"garbage"),
        Err(GroupError::Rejected(_))
    ));
    assert!(matches!(
        bob.process(b"empty-id-0000000", b""),
        Err(GroupError::Rejected(_))
    ));

    // A Welcome meant for eve.
    let kp = eve.generate_key_packages(1, false, 3600).unwrap().remove(0);
    let out = alice.add_member("g", &kp, eve.identity_key()).unwrap();
    let welcome = out.welcome.clone().unwrap();
    assert!(matches!(
        bob.process(&welcome.message_id, &welcome.payload),
        Err(GroupError::WelcomeNotForUs)
    ));
    alice.abort_commit(&out.group_id).unwrap();

    // A tampered ciphertext, then a replay of a valid one.
    let msg = alice.send_text("g", "once").unwrap();
    let mut tampered = msg.payload.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    assert!(matches!(
        bob.process(b"tampered-id-0000", &tampered),
        Err(GroupError::Rejected(_))
    ));
    assert_eq!(
        texts(&bob.process(&msg.message_id, &msg.payload).unwrap()),
        [("alice".into(), "once".into())]
    );
    // The same delivery again: shown once.
    assert!(
        bob.process(&msg.message_id, &msg.payload)
            .unwrap()
            .is_empty()
    );
    // The same ciphertext under a new delivery id: MLS rejects the replay.
    assert!(bob.process(b"replayed-id-0000", &msg.payload).is_err());
    assert_eq!(bob.history("g", 10).unwrap().len(), 1);
    assert_eq!(bob.groups().unwrap(), before);

    // A key package of someone other than the named invitee.
    let kp = eve.generate_key_packages(1, false, 3600).unwrap().remove(0);
    assert!(matches!(
        alice.add_member("g", &kp, bob.identity_key()),
        Err(GroupError::WrongInvitee)
    ));
}

/// A Welcome for a group this client is in already (a redelivery under a new
/// delivery id, which a last-resort key package lets openmls decrypt) is a
/// typed error and changes nothing.
#[test]
fn a_redelivered_welcome_is_already_joined_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut net, mut alice, mut bob, (_, welcome)) = alice_invites_bob(dir.path(), true);
    assert!(matches!(
        bob.process(b"welcome-id-00001", &welcome)
            .unwrap()
            .as_slice(),
        [Event::Joined { .. }]
    ));
    let before = bob.groups().unwrap();
    assert!(matches!(
        bob.process(b"welcome-id-00002", &welcome),
        Err(GroupError::AlreadyJoined)
    ));
    assert_eq!(bob.groups().unwrap(), before);
    net.send(&alice.send_text("g", "still here").unwrap())
        .unwrap();
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [("alice".into(), "still here".into())]
    );
}

#[test]
fn a_profile_open_twice_never_uses_stale_group_state() {
    // Two handles on one profile (a second process, say): each keeps groups
    // in memory, and each must see what the other committed.  A stale copy
    // would reuse a ratchet generation, which the receiver rejects.
    let dir = tempfile::tempdir().unwrap();
    let (mut net, mut alice, mut bob) = alice_and_bob_in_g(dir.path());
    let mut alice2 = Profile::open(
        &dir.path().join("alice"),
        &ProfileKey::Passphrase("pw-alice".into()),
    )
    .unwrap();

    let mut sent = Vec::new();
    for i in 0..5 {
        let p = if i % 2 == 0 { &mut alice } else { &mut alice2 };
        sent.push(p.send_text("g", &format!("m{i}")).unwrap());
    }
    // A commit by one handle, then a message by the other in the new epoch.
    let out = alice2.self_update("g").unwrap();
    net.commit(&mut alice2, out).unwrap();
    sent.push(alice.send_text("g", "after the update").unwrap());

    let mut got = Vec::new();
    for (i, out) in sent.iter().enumerate() {
        if i == 5 {
            got.extend(texts(&net.drain(&mut bob)));
        }
        got.extend(texts(&bob.process(&out.message_id, &out.payload).unwrap()));
    }
    let want: Vec<(String, String)> = ["m0", "m1", "m2", "m3", "m4", "after the update"]
        .iter()
        .map(|t| ("alice".to_string(), t.to_string()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(alice.history("g", 10).unwrap().len(), 6);
    assert_eq!(
        alice.groups().unwrap()[0].epoch,
        alice2.groups().unwrap()[0].epoch
    );
}

#[test]
fn a_batch_applies_good_payloads_skips_bad_ones_and_moves_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let (_net, mut alice, mut bob, (welcome_id, welcome)) = alice_invites_bob(dir.path(), false);
    let one = alice.send_text("g", "one").unwrap();
    let mut tampered = alice.send_text("g", "lost").unwrap().payload;
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let three = alice.send_text("g", "three").unwrap();

    let batch = [
        Delivered {
            seq: 7,
            message_id: &welcome_id,
            payload: &welcome,
        },
        Delivered {
            seq: 8,
            message_id: &one.message_id,
            payload: &one.payload,
        },
        Delivered {
            seq: 9,
            message_id: b"tampered-id-0000",
            payload: &tampered,
        },
        Delivered {
            seq: 10,
            message_id: b"garbage-id-00000",
            payload: b"garbage",
        },
        Delivered {
            seq: 11,
            message_id: &three.message_id,
            payload: &three.payload,
        },
    ];
    let results = bob.process_batch(&batch).unwrap();
    assert_eq!(results.len(), 5);
    assert!(matches!(results[0].as_deref(), Ok([Event::Joined { .. }])));
    assert_eq!(
        texts(results[1].as_ref().unwrap()),
        [("alice".into(), "one".into())]
    );
    // A protocol message of the current epoch that fails to decrypt is
    // reported and dropped (it needs no epoch still to come); garbage is
    // an error.
    assert!(
        matches!(
            results[2].as_deref(),
            Ok([Event::Undecryptable { kept: false, .. }])
        ),
        "{:?}",
        results[2]
    );
    assert!(matches!(results[3], Err(GroupError::Rejected(_))));
    assert_eq!(
        texts(results[4].as_ref().unwrap()),
        [("alice".into(), "three".into())]
    );
    assert_eq!(bob.next_seq().unwrap(), 12);

    // All of it is on disk: a fresh handle sees the group, the history and
    // the cursor, and decrypts the next message.
    drop(bob);
    let mut bob = Profile::open(
        &dir.path().join("bob"),
        &ProfileKey::Passphrase("pw-bob".into()),
    )
    .unwrap();
    assert_eq!(bob.next_seq().unwrap(), 12);
    let texts_on_disk: Vec<String> = bob
        .history("g", 10)
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts_on_disk, ["one", "three"]);
    let four = alice.send_text("g", "four").unwrap();
    assert_eq!(
        texts(&bob.process(&four.message_id, &four.payload).unwrap()),
        [("alice".into(), "four".into())]
    );
    // The same batch again changes nothing: every payload was processed or
    // is still rejected (the tampered one reported as dropped again).
    let again = bob.process_batch(&batch).unwrap();
    assert!(again.iter().filter_map(|r| r.as_ref().ok()).all(|events| {
        events
            .iter()
            .all(|e| matches!(e, Event::Undecryptable { kept: false, .. }))
    }));
    assert_eq!(bob.history("g", 10).unwrap().len(), 3);
}

/// Delivery message ids carry their creation time in their first bytes, so
/// the server's idempotency index and our own `processed` table grow at their
/// right edge; the rest stays random, so ids never repeat.
#[test]
fn message_ids_sort_by_send_time_and_stay_unique() {
    use quicnprotochat_core::group::MESSAGE_ID_TIME_BYTES;

    fn millis(id: &[u8; 16]) -> u64 {
        let mut be = [0u8; 8];
        be[8 - MESSAGE_ID_TIME_BYTES..].copy_from_slice(&id[..MESSAGE_ID_TIME_BYTES]);
        u64::from_be_bytes(be)
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut net, mut alice, mut bob) = alice_and_bob_in_g(dir.path());
    // Alice's clock moves only when the test says so.
    let clock = std::sync::Arc::new(ManualClock::starting_now());
    alice.set_clock(clock.clone());

    let before = clock.unix_ms();
    let mut ids = Vec::new();
    for i in 0..40 {
        let out = alice.send_text("g", &format!("m{i}")).unwrap();
        net.send(&out).unwrap();
        ids.push(out.message_id);
        if i % 10 == 9 {
            clock.advance(std::time::Duration::from_millis(3));
        }
    }
    for pair in ids.windows(2) {
        assert!(
            millis(&pair[0]) <= millis(&pair[1]),
            "ids out of send order"
        );
    }
    // The time part is the clock's: three steps of 3 ms before the last id.
    assert_eq!(millis(&ids[0]), before);
    assert_eq!(millis(&ids[39]), before + 9);
    assert!(
        millis(&ids[39]) > millis(&ids[0]),
        "the time part never moved"
    );
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    // Every one of them decrypts and shows on the other side.
    assert_eq!(texts(&net.drain(&mut bob)).len(), ids.len());
}

/// The record of processed message ids is bounded: ids older than the
/// horizon are forgotten.  A redelivered message is never shown twice either
/// way: a remembered id is dropped silently, a forgotten one is rejected by
/// MLS (its message key is used up).
#[test]
fn processed_ids_are_forgotten_after_the_horizon_and_redeliveries_still_show_nothing() {
    use quicnprotochat_core::group::{MESSAGE_ID_TIME_BYTES, PROCESSED_HORIZON_MS};

    fn id_at(ms: u64, tail: u8) -> [u8; 16] {
        let mut id = [tail; 16];
        id[..MESSAGE_ID_TIME_BYTES].copy_from_slice(&ms.to_be_bytes()[8 - MESSAGE_ID_TIME_BYTES..]);
        id
    }
    let dir = tempfile::tempdir().unwrap();
    let (_net, mut alice, mut bob) = alice_and_bob_in_g(dir.path());
    let clock = std::sync::Arc::new(ManualClock::starting_now());
    bob.set_clock(clock.clone());
    let now = clock.unix_ms();
    let old = alice.send_text("g", "old").unwrap();
    let recent = alice.send_text("g", "recent").unwrap();
    // Delivery ids as if sent 31 days and 1 day ago.
    let old_id = id_at(now - PROCESSED_HORIZON_MS - 24 * 3600 * 1000, 1);
    let recent_id = id_at(now - 24 * 3600 * 1000, 2);
    let batch = [
        Delivered {
            seq: 10,
            message_id: &old_id,
            payload: &old.payload,
        },
        Delivered {
            seq: 11,
            message_id: &recent_id,
            payload: &recent.payload,
        },
    ];
    let first: Vec<_> = bob.process_batch(&batch).unwrap();
    let shown: Vec<_> = first
        .iter()
        .flat_map(|r| texts(r.as_ref().unwrap()))
        .map(|(_, t)| t)
        .collect();
    assert_eq!(shown, ["old", "recent"]);

    // Redelivered (a server restored from a backup, say).
    let again = bob.process_batch(&batch).unwrap();
    assert!(
        matches!(
            again[0].as_deref(),
            Ok([Event::Undecryptable { kept: false, .. }])
        ),
        "the old id was forgotten, so MLS saw the replay and refused it: {:?}",
        again[0]
    );
    assert!(
        matches!(again[1].as_deref(), Ok([])),
        "the recent id is remembered and dropped silently: {:?}",
        again[1]
    );
}

/// Copies a profile's files, as a thief with the device's storage and the
/// passphrase would.
fn steal(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_member_whose_keys_were_stolen_is_healed_by_its_key_update() {
    let dir = tempfile::tempdir().unwrap();
    let (mut net, mut alice, mut bob) = alice_and_bob_in_g(dir.path());
    // Eve copies Bob's profile and passphrase.
    steal(&dir.path().join("bob"), &dir.path().join("eve"));
    let mut eve = Profile::open(
        &dir.path().join("eve"),
        &ProfileKey::Passphrase("pw-bob".into()),
    )
    .unwrap();

    // Before Bob's update Eve reads what Bob reads: the theft is real.
    let before = alice.send_text("g", "before the update").unwrap();
    net.send(&before).unwrap();
    let queued = net.queues.get(&bob.identity_key()).unwrap().clone();
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [("alice".into(), "before the update".into())]
    );
    let mut eve_read = Vec::new();
    for (id, payload) in &queued {
        if let Ok(events) = eve.process(id, payload) {
            eve_read.extend(texts(&events));
        }
    }
    assert_eq!(
        eve_read,
        [("alice".to_string(), "before the update".to_string())]
    );

    // Bob refreshes his keys; Alice processes his commit and writes.
    let update = bob.self_update("g").unwrap();
    let commit = update.commit.clone().unwrap();
    net.commit(&mut bob, update).unwrap();
    net.drain(&mut alice);
    let after = alice.send_text("g", "after the update").unwrap();
    net.send(&after).unwrap();
    assert_eq!(
        texts(&net.drain(&mut bob)),
        [("alice".into(), "after the update".into())]
    );

    // Eve, who sees Bob's commit and Alice's message go by, reads nothing
    // after the update: its secrets came from Bob's fresh keys.
    let mut eve_read = Vec::new();
    for out in [&commit, &after] {
        if let Ok(events) = eve.process(&out.message_id, &out.payload) {
            eve_read.extend(texts(&events));
        }
    }
    assert!(eve_read.is_empty(), "{eve_read:?}");
}

#[test]
fn key_updates_come_due_after_the_message_count_or_the_age() {
    use quicnprotochat_core::KeyUpdatePolicy;
    let dir = tempfile::tempdir().unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(std::time::SystemTime::now()));
    let (mut net, mut alice, _bob) = alice_and_bob_in_g(dir.path());
    alice.set_clock(clock.clone());
    let policy = KeyUpdatePolicy {
        after_messages: 3,
        after_ms: 7 * 24 * 3_600_000,
    };
    assert_eq!(alice.key_update_policy().unwrap(), KeyUpdatePolicy::DEFAULT);
    alice.set_key_update_policy(policy).unwrap();
    assert_eq!(alice.key_update_policy().unwrap(), policy);
    assert!(alice.key_updates_due(policy).unwrap().is_empty());
    for i in 0..3 {
        let out = alice.send_text("g", &format!("m{i}")).unwrap();
        net.send(&out).unwrap();
        let due = alice.key_updates_due(policy).unwrap();
        assert_eq!(
            due.len(),
            usize::from(i == 2),
            "after {} messages: {due:?}",
            i + 1
        );
    }
    alice.record_key_update("g").unwrap();
    assert!(alice.key_updates_due(policy).unwrap().is_empty());

    // Age: not before 7 days, always after 7 days plus the largest spread.
    clock.advance(std::time::Duration::from_secs(7 * 24 * 3600 - 60));
    assert!(alice.key_updates_due(policy).unwrap().is_empty());
    clock.advance(std::time::Duration::from_secs(17 * 3600 + 60));
    assert_eq!(alice.key_updates_due(policy).unwrap(), ["g"]);
}
