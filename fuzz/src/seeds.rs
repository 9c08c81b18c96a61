//! The seed writer: real objects for every target's corpus, and the member
//! profile that `profile_process` runs against.
//!
//! Alice, Bob and Carol are real profiles.  Bob joins Alice's group "g" and
//! keeps an unused key package that Alice's Welcome to group "h" is for; his
//! profile, as it is then, becomes the fixture.  Alice's later messages in
//! "g" (a text, a peer announcement, an update, an add, a remove, a leave
//! proposal) were never processed by it, so each one is a seed that the
//! fixture accepts.  Key packages and leaf nodes live at most 12 weeks
//! (openmls's ceiling); older seeds still parse but stop at the lifetime
//! checks, so write them again now and then.

use std::error::Error;
use std::path::Path;

use quicnprotochat_core::message::AppMessage;
use quicnprotochat_core::{PeerInfo, Profile, ProfileKey};
use quicnprotochat_proto::WIRE_VERSION;
use quicnprotochat_proto::capnp::message::{self, AllocationStrategy, HeapAllocator};
use quicnprotochat_proto::capnp::{self, serialize};
use quicnprotochat_proto::schema::{ErrorCode, listener, service, session};
use quicnprotochat_server::Config;

use crate::profile::{FIXTURE_DIR, FIXTURE_KEY, Member, read_files};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Key-package lifetime: openmls's longest acceptable (12 weeks).
const LIFETIME_SECS: u64 = 60 * 60 * 24 * 28 * 3;

/// One target's seeds, by file name.
type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Everything the seeds are made from.
struct World {
    alice_key: [u8; 32],
    bob_key: [u8; 32],
    key_packages: Seeds,
    /// MLS messages to Bob, and whether the fixture must accept each.
    to_bob: Vec<(&'static str, Vec<u8>, bool)>,
    text: Vec<u8>,
}

/// Writes `corpus/<target>/` for every target and the fixture profile under
/// `fuzz_dir`, replacing what was there, and checks that the fixture accepts
/// the messages meant for it.
pub fn write_all(fuzz_dir: &Path) -> Result<()> {
    let work = tempfile::tempdir()?;
    let world = build(work.path())?;

    let fixture = fuzz_dir.join(FIXTURE_DIR);
    replace_dir(&fixture)?;
    for (name, bytes) in read_files(&work.path().join("bob"))? {
        std::fs::write(fixture.join(name), bytes)?;
    }
    let files = read_files(&fixture)?;
    for (name, payload, accepted) in &world.to_bob {
        let mut member = Member::open(&files);
        let outcome = member.profile.process(&crate::profile::MESSAGE_ID, payload);
        println!("profile_process/{name}: {outcome:?}");
        if *accepted && outcome.is_err() {
            return Err(format!("the fixture refuses its seed {name}").into());
        }
    }

    let mls: Seeds = world
        .to_bob
        .iter()
        .map(|(name, payload, _)| (*name, payload.clone()))
        .chain(world.key_packages.iter().take(1).cloned())
        .collect();
    write_corpus(fuzz_dir, "mls_framing", &mls)?;
    let to_bob: Seeds = world
        .to_bob
        .iter()
        .map(|(name, payload, _)| (*name, payload.clone()))
        .collect();
    write_corpus(fuzz_dir, "profile_process", &to_bob)?;
    write_corpus(fuzz_dir, "key_package", &world.key_packages)?;
    write_corpus(fuzz_dir, "app_message", &app_messages()?)?;
    write_corpus(fuzz_dir, "rpc_frame", &rpc_frames(&world)?)?;
    write_corpus(fuzz_dir, "server_config", &configs(fuzz_dir)?)?;
    Ok(())
}

fn replace_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    Ok(())
}

fn write_corpus(fuzz_dir: &Path, target: &str, seeds: &Seeds) -> Result<()> {
    let dir = fuzz_dir.join("corpus").join(target);
    replace_dir(&dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("{target}: {} seeds", seeds.len());
    Ok(())
}

fn build(dir: &Path) -> Result<World> {
    let mut alice = Profile::create(&dir.join("alice"), &ProfileKey::Raw([1; 32]), "alice")?;
    let mut bob = Profile::create(&dir.join("bob"), &ProfileKey::Raw(FIXTURE_KEY), "bob")?;
    let mut carol = Profile::create(&dir.join("carol"), &ProfileKey::Raw([3; 32]), "carol")?;
    // Two one-time packages and a last-resort one.
    let bob_packages = bob.generate_key_packages(2, true, LIFETIME_SECS)?;
    let carol_package = carol
        .generate_key_packages(1, false, LIFETIME_SECS)?
        .remove(0);

    alice.create_group("g")?;
    let joined = alice.add_member("g", &bob_packages[0], bob.identity_key())?;
    alice.confirm_commit(&joined.group_id)?;
    let welcome_g = joined.welcome.ok_or("no Welcome")?.payload;
    bob.process(&[1; 16], &welcome_g)?;
    alice.create_group("h")?;
    let invited = alice.add_member("h", &bob_packages[1], bob.identity_key())?;
    alice.confirm_commit(&invited.group_id)?;
    let welcome_h = invited.welcome.ok_or("no Welcome")?.payload;
    let bob_key = *bob.identity_key().as_bytes();
    // Closing the profile folds the write-ahead log into the database.
    drop(bob);

    let text = alice.send_text("g", "hello, Bob")?.payload;
    let peer = PeerInfo {
        endpoint_id: [7; 32],
        addrs: vec!["192.0.2.1:4433".parse()?, "[2001:db8::1]:4433".parse()?],
        relay_url: Some("https://relay.example.org/".into()),
    };
    let announce = alice
        .announce_peer("g", &peer)?
        .ok_or("no announcement")?
        .payload;
    let update = alice.self_update("g")?;
    alice.abort_commit(&update.group_id)?;
    let add = alice.add_member("g", &carol_package, carol.identity_key())?;
    alice.abort_commit(&add.group_id)?;
    let remove = alice.remove_member("g", "bob")?;
    alice.abort_commit(&remove.group_id)?;
    let leave = alice.leave("g")?.ok_or("no proposal")?.payload;

    let commit = |c: quicnprotochat_core::CommitOutcome| -> Result<Vec<u8>> {
        Ok(c.commit.ok_or("no commit")?.payload)
    };
    let welcome_carol = add.welcome.clone().ok_or("no Welcome")?.payload;
    let mut key_packages: Seeds = vec![
        ("bob-one-time", bob_packages[1].clone()),
        ("bob-last-resort", bob_packages[2].clone()),
        ("carol", carol_package.clone()),
    ];
    key_packages.push((
        "alice",
        alice.generate_key_packages(1, false, 3600)?.remove(0),
    ));
    Ok(World {
        alice_key: *alice.identity_key().as_bytes(),
        bob_key,
        key_packages,
        to_bob: vec![
            ("welcome-to-h", welcome_h, true),
            ("welcome-for-carol", welcome_carol, false),
            ("text", text.clone(), true),
            ("peer-announcement", announce, true),
            ("commit-update", commit(update)?, true),
            ("commit-add-carol", commit(add)?, true),
            ("commit-remove-bob", commit(remove)?, true),
            ("proposal-leave", leave, true),
        ],
        text,
    })
}

fn app_messages() -> Result<Seeds> {
    let peer = PeerInfo {
        endpoint_id: [0xab; 32],
        addrs: vec!["198.51.100.7:11204".parse()?, "[::1]:9".parse()?],
        relay_url: Some("https://relay.example.org./".into()),
    };
    Ok(vec![
        (
            "text",
            AppMessage::text([1; 16], 1_700_000_000_000, "hello")?.encode()?,
        ),
        (
            "text-escapes",
            AppMessage::text([2; 16], 1, "caf\u{e9} \"quoted\"\n\u{1f600}\\")?.encode()?,
        ),
        (
            "peer-address",
            AppMessage::peer_address([3; 16], 2, &peer).encode()?,
        ),
        (
            "delivery-token",
            AppMessage::delivery_token([4; 16], 1_700_000_000_000, &[0xab; 32]).encode()?,
        ),
        (
            "file",
            AppMessage::file(
                [5; 16],
                1_700_000_000_000,
                "hi.txt",
                "text/plain",
                b"hello".to_vec(),
            )?
            .encode()?,
        ),
        (
            "unsupported",
            br#"{"v":1,"id":"04040404040404040404040404040404","ts":3,"content":{"type":"sticker","pack":"x","n":[1,2.5,null]}}"#
                .to_vec(),
        ),
    ])
}

/// A message in Cap'n Proto stream framing.
fn frame(
    segment_words: Option<u32>,
    fill: impl FnOnce(&mut message::Builder<HeapAllocator>) -> capnp::Result<()>,
) -> Result<Vec<u8>> {
    let mut alloc = HeapAllocator::new();
    if let Some(words) = segment_words {
        // Small fixed-size segments: a multi-segment frame.
        alloc = alloc
            .first_segment_words(words)
            .allocation_strategy(AllocationStrategy::FixedSize);
    }
    let mut m = message::Builder::new(alloc);
    fill(&mut m)?;
    Ok(serialize::write_message_to_words(&m))
}

fn rpc_frames(w: &World) -> Result<Seeds> {
    let kps: Vec<Vec<u8>> = w.key_packages.iter().map(|(_, kp)| kp.clone()).collect();
    let message_id = [0x42; 16];
    let challenge = frame(None, |m| {
        m.init_root::<service::challenge_params::Builder>()
            .set_wire_version(WIRE_VERSION);
        Ok(())
    })?;
    let authenticate = frame(None, |m| {
        let mut r = m
            .init_root::<service::authenticate_params::Builder>()
            .init_request();
        r.set_wire_version(WIRE_VERSION);
        r.set_access_token(b"an access token of thirty-two bytes or more");
        r.set_identity_key(&w.alice_key);
        r.set_signature(&[0x5a; 64]);
        Ok(())
    })?;
    let enqueue = |segment_words| {
        frame(segment_words, |m| {
            let mut p = m.init_root::<session::enqueue_params::Builder>();
            p.reborrow().init_recipients(1).set(0, &w.bob_key);
            p.set_message_id(&message_id);
            p.set_payload(&w.text);
            Ok(())
        })
    };
    let envelopes = |mut list: capnp::struct_list::Builder<
        '_,
        quicnprotochat_proto::schema::envelope::Owned,
    >| {
        for (i, seq) in [7u64, 8].into_iter().enumerate() {
            let mut e = list.reborrow().get(u32::try_from(i).unwrap_or(0));
            e.set_seq(seq);
            e.set_message_id(&message_id);
            e.set_payload(&w.text);
            e.set_enqueued_at_ms(1_700_000_000_000);
        }
    };
    let mut stream = challenge.clone();
    stream.extend_from_slice(&authenticate);
    Ok(vec![
        ("challenge", challenge),
        ("authenticate", authenticate),
        ("challenge-then-authenticate", stream),
        (
            "register",
            frame(None, |m| {
                m.init_root::<session::register_params::Builder>()
                    .set_username("alice");
                Ok(())
            })?,
        ),
        (
            "publish-key-packages",
            frame(None, |m| {
                let mut list = m
                    .init_root::<session::publish_key_packages_params::Builder>()
                    .init_key_packages(u32::try_from(kps.len()).unwrap_or(0));
                for (i, kp) in kps.iter().enumerate() {
                    list.set(u32::try_from(i).unwrap_or(0), kp);
                }
                Ok(())
            })?,
        ),
        (
            "fetch-key-package",
            frame(None, |m| {
                m.init_root::<session::fetch_key_package_params::Builder>()
                    .set_identity_key(&w.bob_key);
                Ok(())
            })?,
        ),
        ("enqueue", enqueue(None)?),
        ("enqueue-multi-segment", enqueue(Some(4))?),
        (
            "fetch",
            frame(None, |m| {
                let mut p = m.init_root::<session::fetch_params::Builder>();
                p.set_recipient(&w.bob_key);
                p.set_from_seq(1);
                p.set_limit(256);
                Ok(())
            })?,
        ),
        (
            "ack",
            frame(None, |m| {
                let mut p = m.init_root::<session::ack_params::Builder>();
                p.set_recipient(&w.bob_key);
                p.set_up_to_seq(8);
                Ok(())
            })?,
        ),
        (
            "subscribe",
            frame(None, |m| {
                let mut p = m.init_root::<session::subscribe_params::Builder>();
                p.set_recipient(&w.bob_key);
                p.set_from_seq(1);
                Ok(())
            })?,
        ),
        (
            "deliver",
            frame(None, |m| {
                envelopes(
                    m.init_root::<listener::deliver_params::Builder>()
                        .init_messages(2),
                );
                Ok(())
            })?,
        ),
        (
            "fetch-results",
            frame(None, |m| {
                envelopes(
                    m.init_root::<session::fetch_results::Builder>()
                        .init_messages(2),
                );
                Ok(())
            })?,
        ),
        (
            "enqueue-results-rate-limited",
            frame(None, |m| {
                let mut r = m.init_root::<session::enqueue_results::Builder>();
                let mut e = r.reborrow().init_error();
                e.set_code(ErrorCode::RateLimited);
                e.set_message("rate limited");
                e.set_retry_after_ms(250);
                r.init_seqs(0);
                Ok(())
            })?,
        ),
    ])
}

fn configs(fuzz_dir: &Path) -> Result<Seeds> {
    let page = std::fs::read_to_string(fuzz_dir.join("../docs/src/configuration.md"))?;
    let example = page
        .split("### Complete example")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|block| block.split("```").next())
        .ok_or("no complete example in the configuration page")?;
    let seeds: Seeds = vec![
        ("complete-example", example.as_bytes().to_vec()),
        ("empty", Vec::new()),
        (
            "development",
            b"mode = \"development\"\nlisten = \"[::1]:4433\"\ndb_key = \"\"\n[limits]\nqueue_depth = 7\nmax_payload_bytes = 65536\n".to_vec(),
        ),
        (
            "raw-key-and-rates",
            format!(
                "db_key = \"{}\"\ndb_synchronous = \"normal\"\n\n[limits.rates]\nenqueue_per_ip = {{ per_second = 1, burst = 2 }}\n",
                "0f".repeat(32)
            )
            .into_bytes(),
        ),
    ];
    for (name, text) in &seeds {
        Config::from_toml_str(std::str::from_utf8(text)?)
            .map_err(|e| format!("config seed {name}: {e}"))?;
    }
    Ok(seeds)
}
