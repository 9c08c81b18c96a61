//! `backup`: how long `quicnprotochat-server backup` takes on a store of
//! queued messages, filled through the real server (256-byte payloads, one
//! recipient each, so every message has a payload of its own), and how long
//! `rekey` takes on it; peer: copying the database file and fsyncing the
//! copy (every byte read and written once, nothing decrypted).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use crate::common::{self, Report};
use crate::delivery::server_client;

/// The database key of the measured store (a benchmark's throwaway key).
const KEY: &str = "6b1f0c2e3d4a59687a6b5c4d3e2f10016b1f0c2e3d4a59687a6b5c4d3e2f1001";
const NEW_KEY: &str = "0e1d2c3b4a5968778695a4b3c2d1e0f10e1d2c3b4a5968778695a4b3c2d1e0f1";

/// Options of `backup`.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// Queued messages in the store.
    #[arg(long, default_value_t = 100_000)]
    pub backup_messages: u64,
    /// Recipients they are spread over.
    #[arg(long, default_value_t = 20)]
    pub backup_recipients: u64,
    /// Backups measured (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub backup_runs: usize,
}

async fn fill(p: &common::Proc, a: &BackupArgs) -> anyhow::Result<u64> {
    let (sender, _) = server_client(p, "backup-sender").await?;
    let mut to = Vec::new();
    for i in 0..a.backup_recipients.max(1) {
        to.push(
            server_client(p, &format!("backup-r{i}"))
                .await?
                .1
                .public_key(),
        );
    }
    let to = Arc::new(to);
    let next = Arc::new(AtomicU64::new(0));
    let total = a.backup_messages;
    let mut lanes = Vec::new();
    for _ in 0..16 {
        let (c, to, next) = (sender.clone(), to.clone(), next.clone());
        lanes.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let id = quicnprotochat_core::new_message_id(
                    &quicnprotochat_core::clock::SystemClock::new(),
                )?;
                let mut payload = vec![0x5a; 256];
                payload[..8].copy_from_slice(&k.to_be_bytes());
                let r = usize::try_from(k % to.len() as u64)?;
                c.enqueue(&to[r..=r], id, payload).await?;
            }
            anyhow::Ok(())
        }));
    }
    for l in lanes {
        l.await??;
    }
    Ok(total)
}

fn server(bin: &Path, data: &Path, args: &[&str]) -> anyhow::Result<f64> {
    let began = Instant::now();
    let out = Command::new(bin)
        .env_clear()
        .env("QUICNPROTOCHAT_DATA_DIR", data)
        .env("QUICNPROTOCHAT_DB_KEY", KEY)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let secs = began.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `backup`.
pub async fn run(bin: &Path, core: Option<usize>, a: &BackupArgs) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut p = common::start_server_with(bin, core, Some(&data), &["--db-key", KEY])?;
    let queued = fill(&p, a).await?;
    // A clean stop: the write-ahead log is folded into the file.
    p.terminate()?;
    let db = data.join("quicnprotochat.db");
    let bytes = std::fs::metadata(&db)?.len() as f64;
    let mb = bytes / 1e6;
    let mut backups = Vec::new();
    let mut copies = Vec::new();
    for run in 0..a.backup_runs.max(1) {
        let dest = dir.path().join(format!("backup-{run}.db"));
        let dest_arg = dest.to_str().context("temporary path is not UTF-8")?;
        backups.push(server(bin, &data, &["backup", "--to", dest_arg])?);
        std::fs::remove_file(&dest)?;
        let copy = dir.path().join(format!("copy-{run}.db"));
        let began = Instant::now();
        std::fs::copy(&db, &copy)?;
        std::fs::File::open(&copy)?.sync_all()?;
        copies.push(began.elapsed().as_secs_f64());
        std::fs::remove_file(&copy)?;
    }
    let key_file = dir.path().join("new.key");
    std::fs::write(&key_file, NEW_KEY)?;
    let key_arg = key_file.to_str().context("temporary path is not UTF-8")?;
    let rekey = server(bin, &data, &["rekey", "--new-key-file", key_arg])?;
    let (b, c) = (median(backups.clone()), median(copies.clone()));
    Ok(Report {
        scenario: "backup".into(),
        params: json!({"queued": queued, "recipients": a.backup_recipients, "payload_bytes": 256, "runs": a.backup_runs}),
        figures: json!({
            "store_mb": mb,
            "backup_median_s": b, "backup_s": backups,
            "backup_mb_per_s": mb / b.max(1e-9),
            "rekey_s": rekey, "rekey_mb_per_s": mb / rekey.max(1e-9),
        }),
        peer: "copying the database file and fsyncing the copy".into(),
        peer_figures: json!({"median_s": c, "copy_s": copies, "mb_per_s": mb / c.max(1e-9)}),
        ratio_of: "backup time / file copy time".into(),
        ratio: Some(b / c.max(1e-9)),
        target: "reported".into(),
        pass: None,
        cpu_us_per_op: json!(null),
    })
}
