//! `quicnprotochat-soak`: a bounded soak under faults that counts what
//! people saw.
//!
//! Senders (client-library messengers, one group each with every receiver,
//! listening as a person's `chat` does) send numbered messages at a steady
//! rate through the real server binary,
//! while the soak
//! - kills the server with SIGKILL and starts it again on the same data,
//! - kills receivers (the real command-line client in `listen --json`) with
//!   SIGKILL in the middle of listening and starts them again,
//! - fills the server's disk (its data directory on a small tmpfs, with
//!   `--tmpfs-mb`, which needs root, or on a small file system mounted
//!   beforehand, `--disk`) and empties it again.
//!
//! Then it stops the faults, waits until every receiver has caught up (or a
//! deadline), and counts per receiver and sender from what the receivers
//! printed: a message is *shown* when its line reached the receiver's
//! standard output.  It fails unless nothing acknowledged was lost, nothing
//! was shown twice by one receiver process, nothing shown twice under two
//! message ids (sent twice), and nothing came out of order.  A message shown
//! again by the next process after its receiver was killed is counted apart
//! (`reshown`): printing a line and recording that it was printed cannot be
//! one atomic step, and showing it again beats losing it.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use quicnprotochat_client::harness::{
    ServerProcess, TEST_PASSPHRASE, TEST_TOKEN, install_crypto_provider, test_profile_key,
};
use quicnprotochat_client::{ClientConfig, Messenger};
use serde_json::json;

/// A bounded soak under faults: counts sent, acknowledged, shown, lost,
/// duplicated and reordered messages.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of sending under faults.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Sending messengers (each with its own group of every receiver).
    #[arg(long, default_value_t = 3)]
    senders: usize,
    /// Receiving command-line clients.
    #[arg(long, default_value_t = 2)]
    receivers: usize,
    /// Messages per second per sender.
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
    /// Seconds the receivers get to catch up after the faults stop.
    #[arg(long, default_value_t = 120)]
    drain_seconds: u64,
    /// Put the server's data on a tmpfs of this many MiB and fill it now
    /// and then (needs root: mounts and unmounts it).
    #[arg(long, conflicts_with = "disk")]
    tmpfs_mb: Option<u64>,
    /// Put the server's data on this small file system, already mounted and
    /// writable (e.g. a tmpfs), and fill it now and then.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Seed of the fault schedule [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// The server executable [default: quicnprotochat-server beside this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The client executable [default: quicnprotochat beside this one].
    #[arg(long)]
    cli_bin: Option<PathBuf>,
}

/// A line a receiver printed, with the process lifetime it came from.
struct Shown {
    life: u32,
    line: String,
}

/// A receiver: the command-line client listening, restarted after kills.
struct Receiver {
    name: String,
    profile: PathBuf,
    cli: PathBuf,
    child: Option<Child>,
    life: u32,
    lines: Arc<Mutex<Vec<Shown>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(&mut self) -> anyhow::Result<()> {
        self.life += 1;
        let mut child = Command::new(&self.cli)
            .env_clear()
            .env("QUICNPROTOCHAT_PASSPHRASE", TEST_PASSPHRASE)
            .env("QUICNPROTOCHAT_TOKEN", TEST_TOKEN)
            .env("RUST_LOG", "warn")
            .arg("--profile")
            .arg(&self.profile)
            .args(["--json", "listen"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.cli.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (lines, life) = (self.lines.clone(), self.life);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lock(&lines).push(Shown { life, line });
            }
        });
        let errs = self.stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lock(&errs).push(line);
            }
        });
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A poisoned lock only means a reader thread died mid-push; the lines
/// gathered so far are still whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A small deterministic generator for the fault schedule (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A duration uniformly in `[lo, hi)` milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b) | 1
}

/// The tmpfs holding the server's data, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(parent: &Path, mib: u64) -> anyhow::Result<Self> {
        let dir = parent.join("tmpfs");
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mounting a tmpfs at {} failed (needs root)", dir.display());
        }
        Ok(Self { dir })
    }
}

/// Fills and empties the tmpfs at `dir`.
struct Filler {
    dir: PathBuf,
}

impl Filler {
    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> anyhow::Result<u64> {
        let mut f = std::fs::File::create(self.filler())?;
        let block = vec![0u8; 1 << 16];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += u64::try_from(n).unwrap_or(0),
                Err(_) => break,
            }
        }
        let _ = f.sync_all();
        Ok(written)
    }

    fn empty(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("filler"));
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// What the fault thread did.
#[derive(Debug, Default)]
struct Faults {
    server_kills: u32,
    receiver_kills: u32,
    disk_fills: u32,
    /// times the server was found dead without having been killed
    server_died: u32,
    /// times a receiver's `listen` was found exited without having been killed
    receiver_exits: u32,
}

/// Per-sender outcome of every send.
#[derive(Debug, Default)]
struct Sent {
    acked: HashSet<u64>,
    failed: HashSet<u64>,
    errors: Vec<String>,
}

fn beside_me(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    install_crypto_provider();
    let seed = args.seed.unwrap_or_else(random_seed);
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => beside_me("quicnprotochat-server")?,
    };
    let cli_bin = match &args.cli_bin {
        Some(p) => p.clone(),
        None => beside_me("quicnprotochat")?,
    };
    let work = tempfile::tempdir()?;
    let tmpfs = match args.tmpfs_mb {
        Some(mib) => Some(Tmpfs::mount(work.path(), mib)?),
        None => None,
    };
    let disk = tmpfs.as_ref().map(|t| t.dir.clone()).or(args.disk.clone());
    let server_parent = disk.as_deref().unwrap_or(work.path());
    let server = ServerProcess::start_in(&server_bin, server_parent)?;
    let config = server.client_config()?;
    eprintln!(
        "soak: seed {seed}, {} s, {} senders at {}/s, {} receivers, server at {}{}",
        args.seconds,
        args.senders,
        args.rate,
        args.receivers,
        server.addr(),
        if disk.is_some() {
            ", data on a small disk filled now and then"
        } else {
            ""
        }
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let profiles = work.path().join("profiles");
    let senders = rt.block_on(setup(&profiles, &config, &args))?;

    let mut receivers: Vec<Receiver> = (0..args.receivers)
        .map(|i| Receiver {
            name: format!("r{i}"),
            profile: profiles.join(format!("r{i}")),
            cli: cli_bin.clone(),
            child: None,
            life: 0,
            lines: Arc::default(),
            stderr: Arc::default(),
        })
        .collect();
    for r in &mut receivers {
        r.start()?;
    }

    // Faults on their own thread; the senders on this one (a messenger's
    // send future stays on the thread that polls it).
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let length = Duration::from_secs(args.seconds);
    let fault_thread = {
        let stop = stop.clone();
        let disk = disk.clone();
        let mut server = server;
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let filler = disk.map(|dir| Filler { dir });
            let faults = run_faults(
                &mut server,
                &mut receivers,
                filler.as_ref(),
                &mut rng,
                length,
            );
            stop.store(true, Ordering::SeqCst);
            (faults, server, receivers)
        })
    };
    let local = tokio::task::LocalSet::new();
    let sent: Vec<Sent> = local.block_on(&rt, async {
        let tasks: Vec<_> = senders
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let (stop, attempts, rate) = (stop.clone(), attempts.clone(), args.rate);
                tokio::task::spawn_local(send_loop(i, m, rate, stop, attempts))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap_or_default());
        }
        out
    });
    let (faults, server, mut receivers) = fault_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the fault thread panicked"))?;
    let faults = faults?;

    // Catch up: everything acknowledged should reach every receiver.
    let drain_start = Instant::now();
    let deadline = drain_start + Duration::from_secs(args.drain_seconds);
    loop {
        let behind = receivers
            .iter()
            .map(|r| missing(&r.lines, &sent))
            .sum::<usize>();
        if behind == 0 || Instant::now() >= deadline {
            break;
        }
        for r in &mut receivers {
            if let Some(c) = r.child.as_mut()
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                eprintln!("soak: receiver {} exited by itself; restarting", r.name);
                r.child = None;
                r.start()?;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let drained_in = drain_start.elapsed();
    // A little longer: a duplicate would come now.
    std::thread::sleep(Duration::from_secs(2));
    for r in &mut receivers {
        r.kill();
    }
    let server_log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    drop(server);

    let report = count(&receivers, &sent, args.senders);
    let failed_sends: usize = sent.iter().map(|s| s.failed.len()).sum();
    let acked: usize = sent.iter().map(|s| s.acked.len()).sum();
    let summary = json!({
        "seed": seed,
        "seconds": args.seconds,
        "sent": attempts.load(Ordering::SeqCst),
        "acknowledged": acked,
        "failed_sends": failed_sends,
        "deliveries_expected": acked * args.receivers,
        "shown": report.shown,
        "lost": report.lost,
        "duplicated": report.duplicated,
        "reordered": report.reordered,
        "reshown_after_kill": report.reshown,
        "failed_but_shown": report.failed_but_shown,
        "server_kills": faults.server_kills,
        "server_died": faults.server_died,
        "receiver_kills": faults.receiver_kills,
        "receiver_exits": faults.receiver_exits,
        "disk_fills": faults.disk_fills,
        "drain_seconds": drained_in.as_secs_f64(),
    });
    println!(
        "sent {} acknowledged {} (failed {}), shown {} of {} expected, lost {}, duplicated {}, reordered {}; \
         reshown after a receiver kill {}, failed sends shown anyway {}; \
         faults: {} server kills, {} receiver kills, {} disk fills, server died by itself {}, receivers exited by themselves {}; caught up in {:.1} s",
        attempts.load(Ordering::SeqCst),
        acked,
        failed_sends,
        report.shown,
        acked * args.receivers,
        report.lost,
        report.duplicated,
        report.reordered,
        report.reshown,
        report.failed_but_shown,
        faults.server_kills,
        faults.receiver_kills,
        faults.disk_fills,
        faults.server_died,
        faults.receiver_exits,
        drained_in.as_secs_f64()
    );
    println!("{summary}");
    for note in report.notes.iter().take(30) {
        eprintln!("soak: {note}");
    }
    for s in &sent {
        for e in s.errors.iter().take(3) {
            eprintln!("soak: send error: {e}");
        }
    }
    if report.lost + report.duplicated + report.reordered > 0 || faults.server_died > 0 {
        for r in &receivers {
            for l in lock(&r.stderr).iter().rev().take(10) {
                eprintln!("soak: {} stderr: {l}", r.name);
            }
        }
        let log: Vec<&str> = server_log.lines().collect();
        for l in log.iter().skip(log.len().saturating_sub(30)) {
            eprintln!("soak: server log: {l}");
        }
        bail!("the soak failed: see the counts above");
    }
    if acked == 0 {
        bail!("no message was acknowledged: the soak measured nothing");
    }
    Ok(())
}

/// Registers the senders and receivers and makes one group per sender with
/// every receiver in it.
async fn setup(
    profiles: &Path,
    config: &ClientConfig,
    args: &Args,
) -> anyhow::Result<Vec<Messenger>> {
    let key = test_profile_key();
    for i in 0..args.receivers {
        let name = format!("r{i}");
        Messenger::register(&profiles.join(&name), &key, config.clone(), &name).await?;
    }
    let mut senders = Vec::new();
    for i in 0..args.senders {
        let name = format!("s{i}");
        let m = Messenger::register(&profiles.join(&name), &key, config.clone(), &name).await?;
        for r in 0..args.receivers {
            m.invite(&format!("g{i}"), &format!("r{r}")).await?;
        }
        senders.push(m);
    }
    Ok(senders)
}

/// Sends `soak s{i} {n}` at `rate` per second until told to stop.  A send
/// that fails is not retried: the user was told it failed (a retry would
/// be a new message).
async fn send_loop(
    i: usize,
    m: Messenger,
    rate: f64,
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
) -> Sent {
    let mut sent = Sent::default();
    // Like a person's client in `chat`, the sender listens too: that is how
    // it learns what its group members announce (their delivery tokens
    // among it), and how it rides out the server's restarts.
    let listening = match m.listen().await {
        Ok(mut events) => Some(tokio::task::spawn_local(async move {
            while events.next().await.is_some() {}
        })),
        Err(e) => {
            sent.errors.push(format!("s{i}: listening failed: {e}"));
            None
        }
    };
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let group = format!("g{i}");
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        attempts.fetch_add(1, Ordering::SeqCst);
        let text = format!("soak s{i} {n}");
        match tokio::time::timeout(Duration::from_secs(60), m.send(&group, &text)).await {
            Ok(Ok(())) => {
                sent.acked.insert(n);
            }
            Ok(Err(e)) => {
                sent.failed.insert(n);
                sent.errors.push(format!("s{i} {n}: {e}"));
            }
            Err(_) => {
                sent.failed.insert(n);
                sent.errors.push(format!("s{i} {n}: no answer within 60 s"));
            }
        }
        n += 1;
    }
    if let Some(l) = listening {
        l.abort();
    }
    sent
}

/// Runs the fault schedule for `length`.
fn run_faults(
    server: &mut ServerProcess,
    receivers: &mut [Receiver],
    disk: Option<&Filler>,
    rng: &mut Rng,
    length: Duration,
) -> anyhow::Result<Faults> {
    let mut faults = Faults::default();
    let start = Instant::now();
    let end = start + length;
    let mut next_server_kill = start + rng.ms(6_000, 14_000);
    let mut next_receiver_kill = start + rng.ms(3_000, 8_000);
    let fills: Vec<Instant> = if disk.is_some() {
        vec![start + length / 3, start + length * 2 / 3]
    } else {
        Vec::new()
    };
    let mut fills = fills.into_iter().peekable();
    while Instant::now() < end {
        let now = Instant::now();
        if !server.is_running() {
            faults.server_died += 1;
            eprintln!("soak: the server died by itself; starting it again");
            server.restart()?;
        }
        for r in receivers.iter_mut() {
            if let Some(c) = r.child.as_mut()
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                faults.receiver_exits += 1;
                eprintln!(
                    "soak: receiver {} exited by itself; starting it again",
                    r.name
                );
                r.child = None;
                r.start()?;
            }
        }
        if now >= next_server_kill {
            server.kill();
            faults.server_kills += 1;
            std::thread::sleep(rng.ms(100, 2_000));
            server.restart()?;
            next_server_kill = Instant::now() + rng.ms(6_000, 14_000);
        }
        if now >= next_receiver_kill && !receivers.is_empty() {
            let len = u64::try_from(receivers.len()).unwrap_or(1);
            let idx = usize::try_from(rng.next() % len).unwrap_or(0);
            if let Some(r) = receivers.get_mut(idx) {
                r.kill();
                faults.receiver_kills += 1;
                std::thread::sleep(rng.ms(0, 1_000));
                r.start()?;
            }
            next_receiver_kill = Instant::now() + rng.ms(3_000, 8_000);
        }
        if let (Some(t), Some(at)) = (disk, fills.peek())
            && now >= *at
        {
            fills.next();
            let bytes = t.fill()?;
            faults.disk_fills += 1;
            eprintln!("soak: disk full ({} KiB of filler)", bytes / 1024);
            std::thread::sleep(rng.ms(3_000, 6_000));
            t.empty();
            eprintln!("soak: disk emptied");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !server.is_running() {
        faults.server_died += 1;
        server.restart()?;
    }
    Ok(faults)
}

/// A message line a receiver printed: (sender index, number, message id).
fn parse(line: &str) -> Option<(usize, u64, String)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("event")?.as_str()? != "message" {
        return None;
    }
    let text = v.get("text")?.as_str()?;
    let mut parts = text.strip_prefix("soak s")?.split(' ');
    let sender = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    let id = v.get("id").map(|i| i.to_string()).unwrap_or_default();
    Some((sender, n, id))
}

/// How many acknowledged messages `lines` has not shown yet.
fn missing(lines: &Mutex<Vec<Shown>>, sent: &[Sent]) -> usize {
    let shown: HashSet<(usize, u64)> = lock(lines)
        .iter()
        .filter_map(|s| parse(&s.line))
        .map(|(s, n, _)| (s, n))
        .collect();
    sent.iter()
        .enumerate()
        .map(|(i, s)| {
            s.acked
                .iter()
                .filter(|n| !shown.contains(&(i, **n)))
                .count()
        })
        .sum()
}

#[derive(Debug, Default)]
struct Report {
    shown: usize,
    lost: usize,
    duplicated: usize,
    reordered: usize,
    reshown: usize,
    failed_but_shown: usize,
    /// what went wrong, message by message
    notes: Vec<String>,
}

/// Counts, per receiver and sender, from what the receivers printed.
fn count(receivers: &[Receiver], sent: &[Sent], senders: usize) -> Report {
    let mut rep = Report::default();
    for r in receivers {
        let lines = lock(&r.lines);
        // per sender: id -> (number, lives it was shown in)
        let mut by_id: HashMap<(usize, String), (u64, Vec<u32>)> = HashMap::new();
        let mut ids_of: HashMap<(usize, u64), HashSet<String>> = HashMap::new();
        let mut highest: Vec<Option<u64>> = vec![None; senders];
        for s in lines.iter() {
            let Some((sender, n, id)) = parse(&s.line) else {
                continue;
            };
            let entry = by_id.entry((sender, id.clone())).or_insert((n, Vec::new()));
            let first = entry.1.is_empty();
            if entry.1.contains(&s.life) {
                rep.duplicated += 1;
                rep.notes.push(format!(
                    "{} showed s{sender} {n} twice in one process",
                    r.name
                ));
            } else if !first {
                rep.reshown += 1;
            }
            entry.1.push(s.life);
            ids_of.entry((sender, n)).or_default().insert(id);
            if first {
                rep.shown += 1;
                if let Some(h) = highest.get_mut(sender) {
                    if h.is_some_and(|h| n < h) {
                        rep.reordered += 1;
                        rep.notes
                            .push(format!("{} showed s{sender} {n} after a later one", r.name));
                    }
                    *h = Some(h.map_or(n, |h| h.max(n)));
                }
            }
        }
        for ((sender, n), ids) in &ids_of {
            if ids.len() > 1 {
                rep.duplicated += ids.len() - 1;
                rep.notes.push(format!(
                    "{} showed s{sender} {n} under {} message ids",
                    r.name,
                    ids.len()
                ));
            }
        }
        for (i, s) in sent.iter().enumerate() {
            for n in &s.acked {
                if !ids_of.contains_key(&(i, *n)) {
                    rep.lost += 1;
                    rep.notes
                        .push(format!("{} never showed acknowledged s{i} {n}", r.name));
                }
            }
            rep.failed_but_shown += s
                .failed
                .iter()
                .filter(|n| ids_of.contains_key(&(i, **n)))
                .count();
        }
    }
    rep
}
